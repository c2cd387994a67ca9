"""Small hand-built datasets for tests that need no loader, and silo identities from a dev PKI."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality
from federation import pki
from federation.secagg import ca_cert_verifier

REPO = Path(__file__).resolve().parent.parent


def toy_dataset(
    n: int = 200,
    *,
    modalities: tuple[int, ...] = (1, 2, 3),
    length: int = 50,
    n_classes: int = 3,
    records_per_patient: int = 1,
    seed: int = 0,
) -> ClinicalDataset:
    """``n`` random samples with the given channels per modality, fully observed."""
    rng = np.random.default_rng(seed)
    mods = tuple(
        Modality(name=f"m{i}", channels=tuple(f"m{i}c{j}" for j in range(k))) for i, k in enumerate(modalities)
    )
    info = DatasetInfo(
        name="toy",
        modalities=mods,
        sampling_rate_hz=1.0,
        length=length,
        classes=tuple(f"class{c}" for c in range(n_classes)),
        task="toy",
    )
    x = rng.normal(size=(n, info.n_features, length)).astype(np.float32)
    return ClinicalDataset(
        info=info,
        x=x,
        observed=np.ones_like(x, dtype=bool),
        y=rng.integers(0, n_classes, size=n),
        sample_ids=tuple(f"toy/{i}" for i in range(n)),
        patient_ids=tuple(f"p{i // records_per_patient}" for i in range(n)),
    )


def secagg_identities(folder: Path, n: int):
    """A dev PKI for ``n`` silos in ``folder``: (CA verifier, signing key per silo, certificate PEM per silo)."""
    dev = pki.dev_pki(folder, n)
    verify = ca_cert_verifier(pki.load_certificate(dev.ca.cert))
    keys = {sid: pki.load_private_key(p.key) for sid, p in dev.silos.items()}
    certs = {sid: p.cert.read_bytes() for sid, p in dev.silos.items()}
    return verify, keys, certs
