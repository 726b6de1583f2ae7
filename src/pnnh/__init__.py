"""pnnh: deep networks without residual connections, by the Plain Neural Net Hypothesis.

    import pnnh
    model = pnnh.create_model("pnnh56", num_classes=10, in_chans=1)
    pnnh.count_params(model), pnnh.find_shortcuts(model)   # about half a ResNet-56, and []
    model = pnnh.load("runs/p56")                           # a trained run, ready to use
"""
from pnnh.io import package_version
from pnnh.models import CoderSpec, count_params, create_model, find_shortcuts, list_models, register_model
from pnnh.models import ConversionError, PNNHConv, PNNHLinear, PNNHStage, convert

__version__ = package_version()

from pnnh import train  # noqa: E402  (callable: pnnh.train(config) -> TrainResult)
from pnnh.models.fold import fold  # noqa: E402
from pnnh.models.base import Classifier  # noqa: E402
from pnnh.train.load import load  # noqa: E402  (pnnh.load(run_dir) -> the trained model)

from_pretrained = Classifier.from_pretrained  # a local folder or a Hub repo id (pip install 'pnnh[hub]')

__all__ = ["create_model", "list_models", "register_model", "count_params", "find_shortcuts", "CoderSpec",
           "train", "fold", "load", "from_pretrained", "PNNHConv", "PNNHStage", "PNNHLinear", "convert",
           "ConversionError"]
