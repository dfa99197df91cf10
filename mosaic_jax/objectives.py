"""Named training objectives: weighted sums of the loss library's terms.

The paper (Gupta et al. 2025) does not publish the exact term weights of MoSAiC-1 and MoSAiC-2;
the definitions here are our reading of it (see README):

- ``mosaic1``: NT-Xent within S1, NT-Xent within S2 (two augmented views each), inter-modal
  NT-Xent between the S1 and S2 projections of the same location, MulSupCon between the two
  views of the fused S1+S2 projection, and BCE of the classifier on the fused features.
- ``mosaic2``: ``mosaic1`` with the two intra-modal NT-Xent terms replaced by MulSupCon over each
  modality's two views (supervision-aware intra-modal terms).
- baselines: ``simclr`` (one modality, single tower), ``dual_simclr`` (inter-modal only),
  ``iai_simclr`` (IaI-SimCLR: intra S1 + intra S2 + inter, tau 0.5), ``supcon`` (single-label
  SupCon on the fused projection, the class of a sample being its first label), ``mulsupcon``
  (MulSupCon on the fused projection only), ``supervised`` (BCE only).

A term maps the model outputs of the two views to a scalar. Outputs are the dicts of
`TwoTower` (keys ``intra_s1`` ... ``logits``) or `SingleTower` (``z``, ``logits``). The
inter-modal term reads the S1 and S2 projections of the same view: by default of views a and b
(averaged), or of a separate third view (config ``loss.inter_view = 'third'``: IaI-SimCLR's
published step, three forward passes per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mosaic_jax import losses

Outputs = Mapping[str, jax.Array]

# objective -> terms it sums. Single-tower objectives use the `z` projection.
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "mosaic1": ("intra_s1", "intra_s2", "inter", "mulsupcon", "bce"),
    "mosaic2": ("sup_intra_s1", "sup_intra_s2", "inter", "mulsupcon", "bce"),
    "simclr": ("simclr",),
    "dual_simclr": ("inter",),
    "iai_simclr": ("intra_s1", "intra_s2", "inter"),
    "supcon": ("supcon",),
    "mulsupcon": ("mulsupcon",),
    "supervised": ("bce",),
}

# Objectives whose model is one encoder (on one modality, or on S1+S2 channels: early fusion).
SINGLE_TOWER_ONLY = ("simclr",)
# Objectives that need labels; the others are self-supervised.
SUPERVISED = ("mosaic1", "mosaic2", "supcon", "mulsupcon", "supervised")


def terms_of(objective: str) -> tuple[str, ...]:
    """Names of the terms `objective` sums; ValueError naming the valid objectives otherwise."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective]


def _term_fns(hp: Mapping[str, Any], axis_name, out_inter: Outputs | None
              ) -> dict[str, Callable[..., jax.Array]]:
    """The term functions (a, b, labels, label_mask) -> scalar for the hyper-parameters `hp`."""
    t_intra, t_inter, t_sup = hp["t_intra"], hp["t_inter"], hp["t_sup"]
    kw = dict(axis_name=axis_name, block_size=hp.get("block_size") or None)

    def ntx(za, zb, tau):
        return losses.nt_xent(za, zb, temperature=tau, **kw)

    def msc(za, zb, y, m, tau):
        return losses.multilabel_supcon(za, zb, y, temperature=tau, label_mask=m,
                                        weighting=hp["mulsupcon_weighting"], **kw)

    def supcon(a, b, y, m):
        has_label = jnp.any(y > 0, axis=1)
        first = jnp.argmax(y > 0, axis=1).astype(jnp.int32)
        return losses.supcon(a["z_fused"], b["z_fused"], first, temperature=t_sup,
                             label_mask=m & has_label, axis_name=axis_name)

    def bce(a, b, y, m):
        return 0.5 * (losses.multilabel_bce(a["logits"], y, label_mask=m, axis_name=axis_name)
                      + losses.multilabel_bce(b["logits"], y, label_mask=m, axis_name=axis_name))

    def inter(a, b, y, m):
        if out_inter is not None:
            return ntx(out_inter["inter_s1"], out_inter["inter_s2"], t_inter)
        # S1 and S2 of one view are co-registered: each view gives one inter-modal term.
        return 0.5 * (ntx(a["inter_s1"], a["inter_s2"], t_inter)
                      + ntx(b["inter_s1"], b["inter_s2"], t_inter))

    return {
        "intra_s1": lambda a, b, y, m: ntx(a["intra_s1"], b["intra_s1"], t_intra),
        "intra_s2": lambda a, b, y, m: ntx(a["intra_s2"], b["intra_s2"], t_intra),
        "inter": inter,
        "sup_intra_s1": lambda a, b, y, m: msc(a["intra_s1"], b["intra_s1"], y, m, t_sup),
        "sup_intra_s2": lambda a, b, y, m: msc(a["intra_s2"], b["intra_s2"], y, m, t_sup),
        "mulsupcon": lambda a, b, y, m: msc(a["z_fused"], b["z_fused"], y, m, t_sup),
        "supcon": supcon,
        "simclr": lambda a, b, y, m: ntx(a["z"], b["z"], t_intra),
        "bce": bce,
    }


def compute_objective(
    objective: str,
    out_a: Outputs,
    out_b: Outputs,
    labels: jax.Array,
    label_mask: jax.Array,
    hp: Mapping[str, Any],
    *,
    axis_name=None,
    out_inter: Outputs | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the objective's terms over the two views.

    Args:
      objective: a key of `OBJECTIVES`.
      out_a, out_b: model outputs for view a and view b of the same [n] samples.
      labels: [n, C] multi-hot; label_mask: [n] bool (False: unlabelled sample).
      hp: hyper-parameters, e.g. a config's ``loss`` section: ``weights`` (term -> weight;
        missing terms weigh 1), ``t_intra``, ``t_inter``, ``t_sup`` (temperatures),
        ``mulsupcon_weighting``, optional ``block_size`` (0 or None: the plain losses).
      axis_name: mapped batch axis (the losses then cover the global batch).
      out_inter: outputs of a third view of the same samples; when given, the ``inter`` term
        reads it alone instead of averaging over views a and b.

    Returns:
      (total loss, {term: unweighted value}), float32 scalars equal on every device.
    """
    fns = _term_fns(hp, axis_name, out_inter)
    weights = hp.get("weights", {})
    terms = {name: fns[name](out_a, out_b, labels, label_mask) for name in terms_of(objective)}
    total = sum(float(weights.get(name, 1.0)) * value for name, value in terms.items())
    return total, terms
