"""The authors' README spells the fine-tuning script ``finteune.py``: this runs ``scripts/aptp/finetune.py``."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("finetune.py")), run_name="__main__")
