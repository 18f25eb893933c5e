"""longtail: long-tailed image classification by decoupled training.

The pipeline flows one way: ``data`` -> ``models`` -> ``train`` (stage 1) -> ``classify``
(stage 2) -> ``evaluate``. ``cli`` is a thin shell over these modules.
"""

from longtail.core.errors import LongtailError

__all__ = ["LongtailError", "__version__"]
__version__ = "0.1.0"
