"""``python -m mosaic_jax TOOL [flags]``: the project's command-line tools by their short names.

Training keeps its own entry point, ``python -m mosaic_jax.main`` (also ``python -m mosaic_jax
train``). ``python -m mosaic_jax --help`` lists the tools; ``python -m mosaic_jax TOOL --help``
lists a tool's flags.
"""

from __future__ import annotations

import runpy
import sys

from data_builders import cli

# tool name -> (module that runs it as __main__, one line on what it does)
TOOLS = {
    "train": ("mosaic_jax.main", "train and evaluate a config (same as python -m mosaic_jax.main)"),
    "aot": ("mosaic_jax.training.aot", "compile the train step for a TPU topology on this host"),
    "export": ("mosaic_jax.export.exporter", "export a workdir's checkpoint (embedder, encoders)"),
    "embed": ("mosaic_jax.inference.embed", "embeddings and labels of a dataset split"),
    "predict": ("mosaic_jax.inference.predict", "map a whole S1/S2 scene with an export"),
    "map_accuracy": ("mosaic_jax.inference.map_accuracy",
                     "per-class AP of a probability map against reference labels"),
    "retrieval": ("mosaic_jax.evaluation.retrieval", "content-based image retrieval metrics"),
    "report": ("mosaic_jax.evaluation.report", "compare workdirs: tables and charts"),
}


def _usage() -> str:
    width = max(map(len, TOOLS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in TOOLS.items())
    return f"usage: python -m mosaic_jax TOOL [flags]\n\ntools:\n{rows}\n"


def main(argv: list[str]) -> None:
    """Runs the tool named by `argv[0]` with the rest of `argv` as its command line; `--help`
    (or nothing) lists the tools; an unknown tool is a usage error (one line, exit status 2)."""
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(_usage())
        if not argv:
            print("error: name a tool (see above)", file=sys.stderr)
        raise SystemExit(0 if argv else cli.USAGE_STATUS)
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        print(f"error: unknown tool {tool!r}{cli.did_you_mean(tool, list(TOOLS))} (tools: "
              f"{', '.join(TOOLS)})", file=sys.stderr)
        raise SystemExit(cli.USAGE_STATUS)
    module = TOOLS[tool][0]
    sys.argv = [f"python -m mosaic_jax {tool}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
