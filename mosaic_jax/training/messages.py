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


def _duration(seconds: float) -> str:
    """`42 s`, `7 min`, `3 h 05 min`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress_line(step: int, total: int, loss: float, steps_per_sec: float | None,
                  batch_size: int) -> str:
    """The one console line of a training log step: step, loss, throughput and ETA (the other
    metrics go to TensorBoard). `steps_per_sec` is None before the first measured interval."""
    line = f"step {step}/{total}: loss {loss:.4f}"
    if steps_per_sec:
        line += (f", {steps_per_sec:.2f} steps/s ({steps_per_sec * batch_size:.0f} patches/s)"
                 f", ETA {_duration((total - step) / steps_per_sec)}")
    return line


def parameters_line(count: int, nbytes: int, path: str) -> str:
    """The run's one line on its model size; the table itself is in the file `path`."""
    return f"Model: {count:,} parameters ({nbytes / 1e6:.1f} MB); table in {path}"
