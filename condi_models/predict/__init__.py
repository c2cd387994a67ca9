"""``condi predict``: apply a trained checkpoint to clinical records, imputing missing parts and classifying.

- :mod:`.inputs` reads a WFDB record, a Sleep-EDF PSG or a MIMIC-IV stay onto the checkpoint's layout;
- :mod:`.options` holds the sampler settings and the missingness simulated for demonstration;
- :mod:`.engine` reads records ahead and sends the windows of several records to the model per call;
- :mod:`.pipeline` imputes, classifies and writes ``imputed.npz``, ``prediction.json`` and ``predictions.csv``;
- :mod:`.figure` draws ``record.png``;
- :mod:`.cli` is the command (``condi predict`` or ``python -m condi_models.predict``).
"""

from condi_models.predict.cli import add_predict_parser, main
from condi_models.predict.inputs import InputError, LoadedRecord, expand_inputs, load_record
from condi_models.predict.options import HideSpec, PredictOptions
from condi_models.predict.pipeline import RecordResult, SegmentPrediction, predict_record, predict_records

__all__ = [
    "HideSpec",
    "InputError",
    "LoadedRecord",
    "PredictOptions",
    "RecordResult",
    "SegmentPrediction",
    "add_predict_parser",
    "expand_inputs",
    "load_record",
    "main",
    "predict_record",
    "predict_records",
]
