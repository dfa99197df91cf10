"""What the training program says about a run (mosaic_jax/training/messages.py)."""

from mosaic_jax.training import messages


def test_run_messages():
    assert messages.init_from_line("/r/demo", 160, "linear_probe") == (
        "Encoders from /r/demo, checkpoint step 160: frozen (linear probe: only the new "
        "classifier trains).")
    assert "fine-tuned" in messages.init_from_line("/r/demo", 160, "full")
    assert messages.done_line(160, 0, 12.3) == "Done: 160 steps in 12 s."
    assert messages.done_line(160, 80, 7.0) == (
        "Done: step 160; this run did 80 steps (resumed at step 80) in 7 s.")

