"""forest_inventory: the user-facing layer (command line, run options, notebook API).

It sits above the three working packages and is the one import name a user needs:
``pipeline`` (inference core, no torch), ``models`` (training, compression; torch) and
``flows`` (Prefect orchestration). Nothing below imports it.
"""

from importlib.metadata import PackageNotFoundError, version

from forest_inventory.api import Inventory, inventory, load_inventory, plot_crowns

__all__ = ["Inventory", "__version__", "inventory", "load_inventory", "plot_crowns"]

try:
    __version__ = version("forest-inventory")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
