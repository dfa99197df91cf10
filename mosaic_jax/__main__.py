"""``python -m mosaic_jax TOOL [flags]``: the project's command-line tools by their short names.

Training keeps its own entry point, ``python -m mosaic_jax.main`` (also ``python -m mosaic_jax
train``). ``python -m mosaic_jax --help`` lists the tools; ``python -m mosaic_jax TOOL --help``
lists a tool's flags.
"""

from __future__ import annotations

import runpy
import sys

# tool name -> (module that runs it as __main__, one line on what it does)
TOOLS = {
    "train": ("mosaic_jax.main", "train and evaluate a config (same as python -m mosaic_jax.main)"),
    "aot": ("mosaic_jax.training.aot", "compile the train step for a TPU topology on this host"),
    "export": ("mosaic_jax.export.exporter", "export a workdir's checkpoint (embedder, encoders)"),
    "embed": ("mosaic_jax.inference.embed", "embeddings and labels of a dataset split"),
    "predict": ("mosaic_jax.inference.predict", "map a whole S1/S2 scene with an export"),
    "retrieval": ("mosaic_jax.evaluation.retrieval", "content-based image retrieval metrics"),
    "report": ("mosaic_jax.evaluation.report", "compare workdirs: tables and charts"),
}


def _usage() -> str:
    width = max(map(len, TOOLS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in TOOLS.items())
    return f"usage: python -m mosaic_jax TOOL [flags]\n\ntools:\n{rows}\n"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        sys.exit(0 if argv else 2)
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        sys.stderr.write(_usage() + f"error: unknown tool {tool!r}\n")
        sys.exit(2)
    module = TOOLS[tool][0]
    sys.argv = [f"python -m mosaic_jax {tool}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
