"""Which MIMIC-IV items make up each channel of the ICU dataset, and how an hour of them is summarised.

Every channel is one row of :data:`VARIABLES`. Item ids are those of the MIMIC-IV 2.2 dictionaries
(``icu/d_items`` for chartevents, inputevents and outputevents; ``hosp/d_labitems`` for labevents).
The sanity range is checked on each recorded value (after unit conversion) before hourly
aggregation; a value outside it is treated as a charting error, dropped and counted.

Hourly aggregation:

- ``mean``: the mean of the values charted in the hour (vitals, neuro scores, labs);
- ``sum``: the amount recorded in the hour (urine output; infused volumes, where an infusion that
  spans several hours is shared out in proportion to its overlap with each hour);
- ``active``: 1.0 in an hour that any infusion of the items overlaps, else 0.0. MIMIC-IV records
  every ICU infusion, so the absence of one is a real "not given": such a channel is observed over
  the whole window, the convention of MIMIC-Extract for interventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["chartevents", "labevents", "outputevents", "inputevents"]
Aggregation = Literal["mean", "sum", "active"]


@dataclass(frozen=True)
class Variable:
    """One channel: its modality, the items it is read from, its unit, sanity range and aggregation.

    ``itemids`` empty means every item of ``source`` recorded in ``unit`` (used for total input).
    Rows of inputevents summed as volumes are used only when their ``amountuom`` is ``unit``.
    """

    name: str
    modality: str
    source: Source
    itemids: tuple[int, ...]
    unit: str
    low: float
    high: float
    aggregation: Aggregation = "mean"
    fahrenheit_itemids: tuple[int, ...] = ()  # charted in °F, converted to °C before the range check


def _chart(name: str, modality: str, itemids: tuple[int, ...], unit: str, low: float, high: float) -> Variable:
    return Variable(name, modality, "chartevents", itemids, unit, low, high)


def _lab(name: str, modality: str, itemids: tuple[int, ...], unit: str, low: float, high: float) -> Variable:
    return Variable(name, modality, "labevents", itemids, unit, low, high)


URINE_ITEMIDS = (226559, 226560, 226561, 226584, 226563, 226564, 226565, 226567, 226557, 226558)
# NaCl 0.9%, 0.45%, 3%; LR; D5W; D5 1/2NS; D5NS; D5LR; D5 1/4NS; sterile water.
CRYSTALLOID_ITEMIDS = (225158, 225159, 225161, 225828, 220949, 225823, 225825, 225827, 225941, 225944)
# Norepinephrine, epinephrine, phenylephrine, vasopressin, dopamine.
VASOPRESSOR_ITEMIDS = (221906, 221289, 221749, 222315, 221662)

# GU irrigant (227488/227489) is left out of urine output: it is irrigation fluid in and out of the
# bladder, and only their difference is urine.
VARIABLES: tuple[Variable, ...] = (
    _chart("heart_rate", "vitals", (220045,), "bpm", 0, 300),
    _chart("sbp", "vitals", (220050, 220179), "mmHg", 20, 300),  # arterial line, then cuff
    _chart("dbp", "vitals", (220051, 220180), "mmHg", 5, 200),
    _chart("mbp", "vitals", (220052, 220181), "mmHg", 10, 250),
    _chart("resp_rate", "vitals", (220210, 224690), "insp/min", 0, 80),
    _chart("spo2", "vitals", (220277,), "%", 10, 100),
    Variable(
        "temperature", "vitals", "chartevents", (223762, 223761), "°C", 25, 45,
        fahrenheit_itemids=(223761,),
    ),
    _chart("gcs_eye", "neuro", (220739,), "score", 1, 4),
    _chart("gcs_verbal", "neuro", (223900,), "score", 1, 5),
    _chart("gcs_motor", "neuro", (223901,), "score", 1, 6),
    # Chemistry: central-lab items only (the 526xx ids are their newer twins); blood-gas analyser
    # electrolytes are another specimen and panel, so they are not mixed in.
    _lab("sodium", "chemistry", (50983, 52623), "mEq/L", 90, 200),
    _lab("potassium", "chemistry", (50971, 52610), "mEq/L", 1, 12),
    _lab("chloride", "chemistry", (50902, 52535), "mEq/L", 50, 160),
    _lab("bicarbonate", "chemistry", (50882,), "mEq/L", 2, 60),
    _lab("creatinine", "chemistry", (50912, 52546), "mg/dL", 0.05, 30),
    _lab("bun", "chemistry", (51006, 52647), "mg/dL", 1, 300),
    _lab("glucose", "chemistry", (50931, 52569), "mg/dL", 10, 2000),
    _lab("anion_gap", "chemistry", (50868, 52500), "mEq/L", -10, 60),
    _lab("calcium", "chemistry", (50893,), "mg/dL", 2, 20),
    _lab("magnesium", "chemistry", (50960,), "mg/dL", 0.2, 15),
    _lab("phosphate", "chemistry", (50970,), "mg/dL", 0.1, 20),
    _lab("hemoglobin", "hematology", (51222, 51640), "g/dL", 1, 25),
    _lab("hematocrit", "hematology", (51221, 51638), "%", 5, 75),
    _lab("wbc", "hematology", (51301, 51300), "K/uL", 0, 500),
    _lab("platelets", "hematology", (51265, 51704), "K/uL", 1, 2000),
    _lab("inr", "hematology", (51237,), "ratio", 0.5, 20),
    _lab("pt", "hematology", (51274,), "sec", 5, 150),
    _lab("ph", "blood_gas", (50820,), "units", 6.5, 8.0),
    _lab("po2", "blood_gas", (50821,), "mmHg", 10, 800),
    _lab("pco2", "blood_gas", (50818,), "mmHg", 5, 200),
    _lab("lactate", "blood_gas", (50813, 52442, 53154), "mmol/L", 0.1, 30),
    _lab("base_excess", "blood_gas", (50802,), "mEq/L", -40, 40),
    Variable("urine_output", "fluids", "outputevents", URINE_ITEMIDS, "mL", 0, 5000, "sum"),
    Variable("input_total", "fluids", "inputevents", (), "mL", 0, 10000, "sum"),
    Variable("crystalloids", "fluids", "inputevents", CRYSTALLOID_ITEMIDS, "mL", 0, 10000, "sum"),
    # The range applies to the infusion's amount (mg or units, by drug); only an overlap counts.
    Variable("vasopressor", "fluids", "inputevents", VASOPRESSOR_ITEMIDS, "on/off", 0, 10000, "active"),
)

MODALITY_ORDER: tuple[str, ...] = ("vitals", "neuro", "chemistry", "hematology", "blood_gas", "fluids")


def variables_of(source: Source) -> tuple[Variable, ...]:
    """The variables read from one source table, in channel order."""
    return tuple(v for v in VARIABLES if v.source == source)
