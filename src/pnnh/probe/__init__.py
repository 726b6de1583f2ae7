"""The dissipating-inputs probe (PNNH.md section 5): per-layer similarity of a net's
representation to its input, with a noise floor, neuron survival, signal-propagation
statistics and gradient norms."""
from pnnh.probe.core import CROSSING_MARGIN, crossing_layer, probe_model, probe_summary
from pnnh.probe.dists import DISTS
from pnnh.probe.hooks import feature_layers, preserved_state
from pnnh.probe.metrics import linear_cka, ridge_recoverability
from pnnh.probe.plots import plot_probe

__all__ = ["probe_model", "probe_summary", "crossing_layer", "feature_layers", "preserved_state",
           "linear_cka", "ridge_recoverability", "plot_probe", "DISTS", "CROSSING_MARGIN"]
