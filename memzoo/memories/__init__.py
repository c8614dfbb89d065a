"""One file per memory design: its config dataclass, its MemoryModule, its MemoryState.

Importing this package imports every module in this folder, and each registers its designs with
``@memzoo.registry.register``: adding a design is adding a file here (see docs, "Add your own
memory design").
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
