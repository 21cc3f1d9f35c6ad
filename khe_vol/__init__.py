"""khe-vol: volumetric MRI response assessment for kaposiform hemangioendothelioma."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("khe-vol")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
