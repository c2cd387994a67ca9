"""How much of the classifier's fused vector each part makes up at initialisation (issue 12, item 5).

Run from the repository root:
    .venv/bin/python benchmarks/fusion_scale.py [--ptbxl ../shared/data/ptbxl] [--records 64]

For a freshly built CondI model (the ``small`` size) and the first ``--records`` PTB-XL records at
ps = pw = 0.8 (points), with and without modality drops, it prints, for the joint LayerNorm
(checkpoints before per-part norms) and for per-part LayerNorms (the default), the share of the
fused vector's squared norm and of its across-sample variance held by each part: omega_ins (the
only part computed from the record's values), the W_mod row, and omega_cond.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from _common import MODEL_SIZES

from condi_models.batches import fit_visible, iterate_batches, prepare_split
from condi_models.configfile import parse_config
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.sources import load_source
from condi_models.nn.model import CondIModel
from condi_models.simulation import ExperimentConfig

PARTS = ("omega_ins", "W_mod", "omega_cond")


def shares(model: CondIModel, x: torch.Tensor, observed: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(share of squared norm, share of across-sample variance) per part of the head's input."""
    with torch.no_grad():
        fused = model.features(x, observed)
        if model.classifier.part_norms is None:
            fused = model.classifier.head.norm(fused)
    parts = fused.view(x.shape[0], model.cfg.n_modalities, len(PARTS), model.cfg.embed_dim)
    sq = (parts**2).sum(dim=(0, 1, 3)).numpy()
    var = parts.var(dim=0).sum(dim=(0, 2)).numpy()
    return sq / sq.sum(), var / var.sum()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ptbxl", default="../shared/data/ptbxl")
    p.add_argument("--records", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    base = {"data": {"source": "ptbxl", "path": args.ptbxl}, "model": {"variant": "condi", **MODEL_SIZES["small"]}}
    cfg = parse_config(base, ExperimentConfig, "fusion_scale")
    dataset = load_source(cfg.data)
    sample = dataset.subset(np.arange(min(args.records, len(dataset))))
    print("| modality drops | fusion norm | squared norm: " + " / ".join(PARTS) + " | across-sample variance |")
    print("| --- | --- | --- | --- |")
    for p_drop in (0.0, 0.5):
        spec = MissingnessSpec(ps=0.8, pw=0.8, p_drop=p_drop)
        split = prepare_split(sample, fit_visible(sample, spec), spec)
        batch = next(iterate_batches(split, len(split), window=250, rng=None, device=torch.device("cpu")))
        for fusion in ("joint", "per_part"):
            classifier = {**MODEL_SIZES["small"]["classifier"], "fusion_norm": fusion}
            model_cfg = cfg.model.model_copy(update={"classifier": classifier}).build(dataset.info, 250)
            torch.manual_seed(0)
            model = CondIModel(model_cfg).eval()
            norm_share, var_share = shares(model, batch.x, batch.observed)
            print(f"| p_drop {p_drop:g} | {fusion} | {' / '.join(f'{v:.2f}' for v in norm_share)} | "
                  f"{' / '.join(f'{v:.2f}' for v in var_share)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
