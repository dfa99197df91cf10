"""What the training program says on the console about a run: where its encoders come from
and how far it got. Pure functions of the run's facts (the loop prints them)."""

from __future__ import annotations


def init_from_line(init_from: str, step: int, train_mode: str) -> str:
    """What a probe or fine-tune run says about the encoders it starts from."""
    if train_mode == "linear_probe":
        how = "frozen (linear probe: only the new classifier trains)"
    else:
        how = "fine-tuned (every weight trains; the classifier is new)"
    return f"Encoders from {init_from}, checkpoint step {step}: {how}."


def done_line(final_step: int, start_step: int, seconds: float) -> str:
    """The first words of the closing line: steps done in this run and their time (after a
    resume, how far the run got before)."""
    done = final_step - start_step
    if start_step:
        return (f"Done: step {final_step}; this run did {done} steps (resumed at step "
                f"{start_step}) in {seconds:.0f} s.")
    return f"Done: {final_step} steps in {seconds:.0f} s."
