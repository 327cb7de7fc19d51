"""The embedded toy task (data generator and pretraining) used by the CPU demo."""
