"""The model zoo: small networks written in the project (torchvision/timm do not import beside the
pinned torch), each registered by name and rebuilt from a frozen `ModelConfig`."""

# Importing the modules registers their architectures.
from fedge.models import cnn as _cnn  # noqa: F401,E402
from fedge.models import redcnn as _redcnn  # noqa: F401,E402
from fedge.models import resnet as _resnet  # noqa: F401,E402
from fedge.models import vit as _vit  # noqa: F401,E402
from fedge.models.registry import MODELS, ModelConfig, build_model

__all__ = ["MODELS", "ModelConfig", "build_model"]
