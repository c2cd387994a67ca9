"""CondI learning method: data, models, local training, metrics, simulation. No networking."""
