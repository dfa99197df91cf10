"""What the training program says about a run (mosaic_jax/training/messages.py)."""

from mosaic_jax.training import messages


def test_progress_line_is_one_short_line():
    line = messages.progress_line(20, 160, 16.03142, 2.049, 32)
    assert line == "step 20/160: loss 16.0314, 2.05 steps/s (66 patches/s), ETA 1 min"
    assert messages.progress_line(150, 160, 1.0, 2.0, 8).endswith("ETA 5 s")
    assert messages.progress_line(1000, 100000, 0.5, 2.0, 8).endswith("ETA 13 h 45 min")
    assert messages.progress_line(20, 160, 1.0, 0.5, 8).endswith("ETA 5 min")
    assert messages.progress_line(1, 160, 1.0, None, 8) == "step 1/160: loss 1.0000"


def test_run_messages():
    assert messages.init_from_line("/r/demo", 160, "linear_probe") == (
        "Encoders from /r/demo, checkpoint step 160: frozen (linear probe: only the new "
        "classifier trains).")
    assert "fine-tuned" in messages.init_from_line("/r/demo", 160, "full")
    assert messages.done_line(160, 0, 12.3) == "Done: 160 steps in 12 s."
    assert messages.done_line(160, 80, 7.0) == (
        "Done: step 160; this run did 80 steps (resumed at step 80) in 7 s.")



def test_parameters_line():
    assert messages.parameters_line(393_843, 1_575_372, "runs/demo/parameters.txt") == (
        "Model: 393,843 parameters (1.6 MB); table in runs/demo/parameters.txt")
