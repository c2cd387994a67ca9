"""The CondI model: the Phase A / Phase B entry points and parameter exchange.

One ``CondIModel`` holds everything a silo trains: the shared embeddings W_mod and W_cond, the
observed-context encoder and denoiser of Phase A, and the classifier of Phase B. Baselines and
ablations are the same class with parts switched off by ``Variant`` (``condi_models.nn.config``),
so they run through the same training and federation code.

Parameter exchange is by plain ``{name: tensor}`` dicts (never pickle). ``ParameterRoles`` names
the parameters by role. For aggregation, ``theta`` is every network weight except the shared
embeddings, and the moments of the Gaussian prior under the imputer (fitted by EM, not by an
optimizer; ``condi_models.nn.prior``), the network gate and the factors of its band calibration
(fitted on held-out entries; ``condi_models.training.fit_gate``, ``condi_models.nn.band``);
``w_mod`` and ``w_cond`` are those embeddings.
Modality-specific parts are tagged so a federation can average them only over the silos that
hold the modality:

- whole tensors owned by one modality: the per-modality stems of the context encoder and of the
  instance encoder (a silo without the modality feeds them only zeros);
- row-owned tensors: row m of W_mod belongs to modality m (its profile); row i*M + m of W_cond
  (= W_cond[i, m]) belongs to the *source* modality i, because under eq. 4 that row only ever
  receives gradient from samples in which modality i is observed.

``condi_models.training.aggregation_groups`` turns this ownership into FedAvg weight groups.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from condi_models.nn.band import BandCalibration
from condi_models.nn.classifier import Classifier
from condi_models.nn.config import ModelConfig, VariantSpec
from condi_models.nn.context import ObservedContextEncoder
from condi_models.nn.denoiser import Denoiser
from condi_models.nn.diffusion import (
    NoiseFn,
    NoiseSchedule,
    antithetic_noise,
    ddim_sample,
    ddpm_sample,
    iid_noise,
    make_training_mask,
    masked_noise_loss,
    noise_for_rows,
    randn_like_on,
    sample_quantiles,
    stacked_noise,
)
from condi_models.nn.embeddings import (
    ConditionEmbedding,
    ModalityEmbedding,
    modality_availability,
    modality_fraction,
    n_patches,
)
from condi_models.nn.parts import denoise_in_parts
from condi_models.nn.prior import GaussianPrior, PriorEstimate, TemplateTensors
from condi_models.nn.sampling import Imputation, Prediction, RowGenerators, SamplingOptions

logger = logging.getLogger(__name__)

# Tensors added after checkpoints had been written: absent from a state being loaded, they keep
# their fresh value (band factors of 1: the plain sample quantiles, as before the calibration; a
# draw count of 0: the factors apply as they are, whatever the draws).
OPTIONAL_TENSORS = ("band.factors", "band.draws", "network_gate")


@dataclass
class PhaseADraw:
    """Random choices of one Phase A step, per sample: conditioning mask (B, F, L), step t (B,), noise."""

    cond_mask: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


@dataclass(frozen=True)
class ParameterRoles:
    """Names of parameters by role; see the module docstring for the modality ownership rules."""

    theta: tuple[str, ...]
    w_mod: tuple[str, ...]
    w_cond: tuple[str, ...]
    phase_a: tuple[str, ...]
    phase_b: tuple[str, ...]
    modality_tensors: dict[str, int]
    modality_rows: dict[str, tuple[int, ...]]

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        """Named groups: theta, w_mod, w_cond, phase_a, phase_b and ``modality:<m>`` per modality."""
        out = {"theta": self.theta, "w_mod": self.w_mod, "w_cond": self.w_cond,
               "phase_a": self.phase_a, "phase_b": self.phase_b}
        owners: dict[int, list[str]] = {}
        for name, m in self.modality_tensors.items():
            owners.setdefault(m, []).append(name)
        for name, rows in self.modality_rows.items():
            for m in sorted(set(rows)):
                owners.setdefault(m, []).append(name)
        out.update({f"modality:{m}": tuple(names) for m, names in sorted(owners.items())})
        return out


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu'; 'cuda' / 'cuda:N' (error if CUDA is absent)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r} requested but CUDA is not available on this host")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


class CondIModel(nn.Module):
    """CondI (or one of its variants) as one module; see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        spec = cfg.spec
        m, d = cfg.n_modalities, cfg.embed_dim
        self.register_buffer(
            "channel_modality", torch.tensor(cfg.channel_modality, dtype=torch.long), persistent=False
        )
        self.w_mod = ModalityEmbedding(m, d) if spec.fuse_mod else None
        self.w_cond = ConditionEmbedding(m, d) if spec.uses_wcond else None
        self.schedule = NoiseSchedule(cfg.diffusion) if spec.diffusion else None
        self.context = (
            ObservedContextEncoder(cfg.context, cfg.channel_modality, m, cfg.denoiser.patch_size)
            if spec.diffusion and spec.diffusion_context
            else None
        )
        self.cond_proj = nn.Linear(m * d, cfg.cond_dim) if spec.diffusion and spec.diffusion_wcond else None
        context_dim = (cfg.context.out_dim if self.context is not None else 0) + (
            cfg.cond_dim if self.cond_proj is not None else 0
        )
        self.prior = (
            GaussianPrior(
                cfg.n_features, cfg.prior_lags, cfg.prior_template, cfg.prior_interpolation,
                ridge=cfg.prior_ridge,
                interpolation_span=cfg.prior_interpolation_span,
                hold_edges=cfg.prior_interpolation_edges,
            )
            if spec.diffusion and spec.diffusion_prior and cfg.gaussian_prior
            else None
        )
        self.denoiser = (
            Denoiser(cfg.denoiser, cfg.n_features, cfg.diffusion.steps, context_dim, self.prior is not None)
            if spec.diffusion
            else None
        )
        self.band = BandCalibration() if spec.diffusion else None
        # How much of the network's correction to the prior's estimate sampling applies (0..1):
        # fitted after Phase A on held-out training entries (condi_models.training.fit_gate).
        self.network_gate = nn.Parameter(torch.ones(1), requires_grad=False) if self.prior is not None else None
        self.classifier = Classifier(
            cfg.classifier, cfg.channel_modality, m, d, spec.fusion_parts, cfg.n_classes, spec.missing_pool
        )

    @property
    def spec(self) -> VariantSpec:
        return self.cfg.spec

    @property
    def device(self) -> torch.device:
        return self.channel_modality.device

    # ---- inputs -------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, observed: torch.Tensor) -> None:
        f = self.cfg.n_features
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[1] != f or not x.is_floating_point():
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a float tensor shaped (B, {f}, L), got {got}")
        if not torch.is_tensor(observed) or observed.dtype != torch.bool or observed.shape != x.shape:
            got = (observed.dtype, tuple(observed.shape)) if torch.is_tensor(observed) else type(observed).__name__
            raise ValueError(f"observed must be a bool tensor shaped like x {tuple(x.shape)}, got {got}")

    def availability(self, mask: torch.Tensor) -> torch.Tensor:
        """r (B, M) bool: modality m has any True entry in ``mask`` (B, F, L)."""
        return modality_availability(mask, self.channel_modality, self.cfg.n_modalities)

    # ---- Phase A ----------------------------------------------------------------------------

    def _require_diffusion(self) -> Denoiser:
        if self.denoiser is None:
            raise RuntimeError(f"variant {self.cfg.variant.value!r} has no diffusion imputer (Phase A)")
        return self.denoiser

    def diffusion_context(self, values: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor | None:
        """c = [c_O ; c_cond] per time patch (B, N, ·) from the conditioning data only (None if unused)."""
        b, _, length = values.shape
        n = n_patches(length, self.cfg.denoiser.patch_size)
        r = self.availability(cond_mask)
        parts = []
        if self.context is not None:
            frac = modality_fraction(cond_mask, self.channel_modality, self.cfg.n_modalities)
            parts.append(self.context(values, cond_mask, r, frac))
        if self.cond_proj is not None and self.w_cond is not None:
            c_cond = self.cond_proj(self.w_cond(r).flatten(1))
            parts.append(c_cond[:, None, :].expand(b, n, -1))
        return torch.cat(parts, dim=-1) if parts else None

    @property
    def uses_beat_template(self) -> bool:
        """Whether the prior conditions on beat templates (``condi_models.data.beat_template``)."""
        return self.prior is not None and self.prior.template

    def prior_estimate(
        self, values: torch.Tensor, cond_mask: torch.Tensor, template: TemplateTensors | None = None
    ) -> PriorEstimate | None:
        """What the imputer's latent is a standardized residual of (None without a prior).

        ``template`` is the windows' beat template, read only when the prior uses one; without it
        the prior treats the template as missing.
        """
        return None if self.prior is None else self.prior.conditional(values, cond_mask, template)

    def _eps(
        self,
        denoiser: Denoiser,
        z: torch.Tensor,
        values: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None,
        prior: PriorEstimate | None,
    ) -> torch.Tensor:
        """The noise estimate: the network's, plus with a prior the one that is exact under it.

        If the standardized residual were N(0, 1), E[eps | z_t] = sqrt(1 - alpha_bar_t) z_t. The
        network adds its correction to that, so an untrained one (its head starts at zero)
        samples the prior's Gaussian posterior, and training moves away from it only where the
        data say the residual is not that Gaussian.
        """
        return self._add_prior_eps(denoiser(z, values, cond, t, context, prior), z, t, prior)

    def _add_prior_eps(
        self, eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor, prior: PriorEstimate | None
    ) -> torch.Tensor:
        if prior is None:
            return eps
        return eps + (1.0 - self.schedule.alpha_bars[t]).sqrt().view(-1, 1, 1) * z

    def phase_a_draw(
        self,
        x: torch.Tensor,
        observed: torch.Tensor,
        generator: torch.Generator | None = None,
        borrowed_masks: torch.Tensor | None = None,
    ) -> PhaseADraw:
        """The random part of one Phase A step: conditioning mask, diffusion steps and noise."""
        self._require_diffusion()
        self._check(x, observed)
        cond = make_training_mask(observed, generator, borrowed_masks)
        t = torch.randint(
            0, self.cfg.diffusion.steps, (x.shape[0],), generator=generator,
            device=generator.device if generator is not None else x.device,
        ).to(x.device)
        return PhaseADraw(cond_mask=cond, t=t, noise=randn_like_on(x.shape, x, generator))

    def phase_a_loss_for(
        self, x: torch.Tensor, observed: torch.Tensor, draw: PhaseADraw, template: TemplateTensors | None = None
    ) -> torch.Tensor:
        """Eq. 7 for a given draw: noise error on the held-out observed entries, mean over samples.

        With the Gaussian prior the diffused quantity is (x - m) / s, the standardized residual
        around the prior's estimate from the conditioning entries (and the beat ``template``).
        The template comes from the record's observed entries, some of which this draw holds out:
        it never holds an entry's own value, only the same lead's values one or more beats away.
        """
        denoiser = self._require_diffusion()
        self._check(x, observed)
        cond = draw.cond_mask & observed
        values = x * cond
        prior = self.prior_estimate(values, cond, template)
        x0 = x * observed if prior is None else prior.to_residual(x) * observed
        z = self.schedule.add_noise(x0, draw.t, draw.noise) * (~cond)
        eps = self._eps(denoiser, z, values, cond, draw.t, self.diffusion_context(values, cond), prior)
        return masked_noise_loss(eps, draw.noise, observed & ~cond)

    def phase_a_loss(
        self,
        x: torch.Tensor,
        observed: torch.Tensor,
        generator: torch.Generator | None = None,
        borrowed_masks: torch.Tensor | None = None,
        template: TemplateTensors | None = None,
    ) -> torch.Tensor:
        """Self-supervised diffusion loss (eq. 7): a fresh draw, then ``phase_a_loss_for``."""
        draw = self.phase_a_draw(x, observed, generator, borrowed_masks)
        return self.phase_a_loss_for(x, observed, draw, template)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            # Inference mode rather than no_grad: nothing computed here is ever differentiated, and
            # it skips the version counting no_grad still does.
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    def impute(
        self,
        x: torch.Tensor,
        observed: torch.Tensor,
        opts: SamplingOptions | None = None,
        *,
        generator: torch.Generator | RowGenerators | None = None,
        return_samples: bool = False,
        template: TemplateTensors | None = None,
    ) -> Imputation:
        """Draw ``opts.n_samples`` imputations of the unobserved entries; median point estimate and quantiles.

        ``opts`` (default ``SamplingOptions()``) chooses the sampler, its steps, the chunking and
        the reported quantiles, which are the draws' own widened by the band calibration
        (``condi_models.nn.band``). ``return_samples`` keeps the draws on the result. ``generator``
        may be one per group of rows (``RowGenerators``), so that each group draws as if alone.
        ``template`` is the windows' beat template, cut from their records' (read only when the
        prior uses one). With a prior, the network's noise correction is scaled by
        ``network_gate`` (clamped to [0, 1]; 0 samples the prior's Gaussian posterior).

        What stays fixed over the sampler's steps (context, prior, the denoiser's conditioning
        share) is computed once per call. A window with nothing missing has nothing to sample:
        its draws are its values, and it is left out of the sampler, after its noise was drawn
        all the same, so that no other window's noise depends on which windows were complete.
        """
        opts = opts or SamplingOptions()
        denoiser = self._require_diffusion()
        self._check(x, observed)
        b, f, length = x.shape
        with self._evaluating():
            values = x * observed
            active = (~observed).flatten(1).any(dim=1).nonzero().flatten()
            n_active = active.numel()
            act_values, act_observed = values[active], observed[active]
            prior = None
            if n_active:
                act_template = None if template is None else (template[0][active], template[1][active])
                prior = self.prior_estimate(act_values, act_observed, act_template)
                gate = 1.0 if self.network_gate is None else float(self.network_gate.clamp(0.0, 1.0))
                if gate > 0.0:
                    context = self.diffusion_context(act_values, act_observed)
                    condition = denoiser.condition(act_values, act_observed, context, prior)

                    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                        return self._add_prior_eps(gate * denoise_in_parts(denoiser, z, t, condition), z, t, prior)

                else:
                    # Gate 0 keeps none of the network's correction: the draws are the prior's
                    # posterior, and the denoiser is not run at all (a scoring pass costs the prior's solve).
                    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                        return self._add_prior_eps(torch.zeros_like(z), z, t, prior)

            else:
                # Nothing to sample; the sampler still runs, on no rows, so the generator is drawn from as usual.
                def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    return torch.zeros_like(z)

            chunk = opts.chunk_size or opts.n_samples
            if opts.antithetic and chunk < opts.n_samples:
                # Only the last chunk may be odd, so there is one centre path at most.
                chunk = max(2, chunk - chunk % 2)
            draws = []
            for start in range(0, opts.n_samples, chunk):
                k = min(chunk, opts.n_samples - start)
                target = (~act_observed).repeat(k, 1, 1)
                noise = self._sampler_noise(k, b, active, generator, opts.antithetic)
                if opts.method == "ddpm":
                    z = ddpm_sample(eps_fn, self.schedule, target, noise, opts.clip_x0)
                else:
                    z = ddim_sample(eps_fn, self.schedule, target, opts.steps, noise, opts.eta, opts.clip_x0)
                z = z.view(k, n_active, f, length)
                if prior is not None:
                    z = prior.mean + prior.scale * z
                if n_active < b:
                    # The complete windows' draws are their values, filled in below.
                    z = x.new_zeros((k, b, f, length)).index_copy_(1, active, z)
                draws.append(z)
            samples = torch.cat(draws, dim=0)
            levels = (0.5, *opts.quantiles)
            qs = sample_quantiles(samples, levels)
            qs = torch.cat([qs[:1], self.band.widen(qs[0], qs[1:], opts.quantiles, opts.n_samples)])
            keep = observed[None]
            qs = torch.where(keep, x[None], qs)
            return Imputation(
                x_hat=qs[0],
                median=qs[0],
                quantile_levels=opts.quantiles,
                quantiles=qs[1:],
                samples=torch.where(keep, x[None], samples) if return_samples else None,
            )

    @staticmethod
    def _sampler_noise(
        copies: int,
        rows: int,
        active: torch.Tensor,
        generator: torch.Generator | RowGenerators | None,
        antithetic: bool,
    ) -> NoiseFn:
        """The sampler's noise for ``copies`` stacked copies of ``rows`` windows, of which ``active`` are sampled."""

        def source(g: torch.Generator | None) -> NoiseFn:
            return antithetic_noise(copies, g) if antithetic else iid_noise(g)

        if isinstance(generator, RowGenerators):
            if sum(generator.rows) != rows:
                raise ValueError(f"row generators cover {sum(generator.rows)} rows of a batch of {rows}")
            noise = stacked_noise([(source(g), r) for g, r in zip(generator.generators, generator.rows)], copies)
        else:
            noise = source(generator)
        if active.numel() == rows:
            return noise
        kept = (torch.arange(copies, device=active.device)[:, None] * rows + active[None, :]).flatten()
        return noise_for_rows(noise, copies * rows, kept)

    # ---- Phase B ----------------------------------------------------------------------------

    def features(
        self, x: torch.Tensor, observed: torch.Tensor, availability: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The classifier input vector (B, M * parts * D): per modality [omega_ins ; W_mod ; omega_cond].

        ``availability`` (B, M) is the modality pattern used by eq. 4 and the missing pool; it
        defaults to the one read off ``observed``. Pass the original pattern when ``x`` has been
        imputed, so omega_cond still describes what was missing.
        """
        self._check(x, observed)
        r = self.availability(observed) if availability is None else availability.to(torch.bool)
        if r.shape != (x.shape[0], self.cfg.n_modalities):
            raise ValueError(f"availability must be shaped {(x.shape[0], self.cfg.n_modalities)}, got {tuple(r.shape)}")
        w_mod = self.w_mod(x.shape[0]) if self.w_mod is not None else None
        omega_cond = self.w_cond(r) if self.spec.fuse_cond and self.w_cond is not None else None
        return self.classifier.features(x * observed, observed, r, w_mod, omega_cond)

    def classify(
        self, x: torch.Tensor, observed: torch.Tensor, availability: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Class logits (B, C) for the given values and mask (no imputation happens here)."""
        return self.classifier(self.features(x, observed, availability))

    def phase_b_loss(
        self,
        x: torch.Tensor,
        observed: torch.Tensor,
        y: torch.Tensor,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of ``classify`` on the observed data (paper: Phase B trains on x_O)."""
        return F.cross_entropy(self.classify(x, observed), y, weight=class_weights)

    def predict(
        self,
        x: torch.Tensor,
        observed: torch.Tensor,
        sampling: SamplingOptions | None = None,
        generator: torch.Generator | RowGenerators | None = None,
        return_samples: bool = False,
        template: TemplateTensors | None = None,
    ) -> Prediction:
        """Inference as the variant defines it: impute then classify x_hat, or classify x_O directly.

        ``return_samples`` keeps the imputation draws (for CRPS) on the returned imputation;
        ``template`` is the windows' beat template (see ``impute``).
        """
        with self._evaluating():
            if not self.spec.impute_for_classification:
                return Prediction(logits=self.classify(x, observed), imputation=None)
            imp = self.impute(
                x, observed, sampling, generator=generator, return_samples=return_samples, template=template
            )
            full = torch.ones_like(observed)
            logits = self.classify(imp.x_hat, full, availability=self.availability(observed))
            return Prediction(logits=logits, imputation=imp)

    # ---- parameters and exchange ------------------------------------------------------------

    def parameter_groups(self) -> ParameterRoles:
        """Parameter names by role (aggregation groups, phases, modality ownership)."""
        names = [n for n, _ in self.named_parameters()]
        w_mod = tuple(n for n in names if n.startswith("w_mod."))
        w_cond = tuple(n for n in names if n.startswith("w_cond."))
        theta = tuple(n for n in names if n not in w_mod and n not in w_cond)
        phase_a_prefixes = ("denoiser.", "context.", "cond_proj.") + (
            ("w_cond.",) if self.spec.diffusion and self.spec.diffusion_wcond else ()
        )
        phase_b_prefixes = ("classifier.", "w_mod.") + (("w_cond.",) if self.spec.fuse_cond else ())
        m = self.cfg.n_modalities
        modality_tensors = {}
        for n in names:
            for prefix in ("context.stems.", "classifier.encoder.stems."):
                if n.startswith(prefix):
                    modality_tensors[n] = int(n[len(prefix):].split(".")[0])
        modality_rows = {}
        for n in w_mod:
            modality_rows[n] = tuple(range(m))
        for n in w_cond:
            modality_rows[n] = tuple(i for i in range(m) for _ in range(m))
        return ParameterRoles(
            theta=theta,
            w_mod=w_mod,
            w_cond=w_cond,
            phase_a=tuple(n for n in names if n.startswith(phase_a_prefixes)),
            phase_b=tuple(n for n in names if n.startswith(phase_b_prefixes)),
            modality_tensors=modality_tensors,
            modality_rows=modality_rows,
        )

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """The parameters an optimizer of phase 'a' or 'b' should update."""
        groups = self.parameter_groups()
        if phase not in ("a", "b"):
            raise ValueError(f"phase must be 'a' or 'b', got {phase!r}")
        wanted = set(groups.phase_a if phase == "a" else groups.phase_b)
        return [p for n, p in self.named_parameters() if n in wanted]

    def state_to_named_tensors(self) -> dict[str, torch.Tensor]:
        """All persistent state as {name: CPU tensor} (detached, contiguous copies)."""
        return {n: t.detach().to("cpu").contiguous().clone() for n, t in self.state_dict().items()}

    def load_named_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load {name: tensor}; every name, shape and dtype must match, else ValueError naming the tensor.

        Only the ``OPTIONAL_TENSORS`` may be absent; they keep their current value.
        """
        expected = {n: t for n, t in self.state_dict().items() if n in tensors or n not in OPTIONAL_TENSORS}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"named tensors do not match the {self.cfg.variant.value!r} model: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for name, want in expected.items():
            got = tensors[name]
            if not torch.is_tensor(got):
                raise ValueError(f"tensor {name!r}: expected a torch.Tensor, got {type(got).__name__}")
            if got.dtype != want.dtype:
                raise ValueError(f"tensor {name!r}: expected dtype {want.dtype}, got {got.dtype}")
            if got.shape != want.shape:
                raise ValueError(f"tensor {name!r}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        with torch.no_grad():
            for name, want in expected.items():
                want.copy_(tensors[name].to(want.device))
        logger.debug("loaded %d named tensors into the %s model", len(expected), self.cfg.variant.value)
