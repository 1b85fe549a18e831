"""Run the README's library example and keep what it prints (the output shown in the README).

    python -m benchmarks.readme_example --out benchmarks/results/readme_library_example.txt

Set up as tests/integration/test_readme.py does it: ``./photos`` holds 6 generated test scenes (32 px) and
``$EDJE_HOME/models/edje-demo`` is the tiny random model, so the scores show the format, not a
ranking that means anything. Everything is written under a temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

from edje_search.data.synthetic import make_dataset
from edje_search.models.registry import build_tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the printed lines here (default: stdout only)")
    args = ap.parse_args()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
                 if "Engine.create_or_open" in b)
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_model(seed=0).save_pretrained(tmp / "home" / "models" / "edje-demo")
        make_dataset(tmp / "shapes", n_train=48, n_val=8, n_test=40, image_size=32, seed=1, progress=False)
        (tmp / "work" / "photos").mkdir(parents=True)
        for src in sorted((tmp / "shapes" / "test").glob("*.png"))[:6]:
            shutil.copy(src, tmp / "work" / "photos" / src.name)
        os.environ["EDJE_HOME"] = str(tmp / "home")
        os.chdir(tmp / "work")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(block, {})  # noqa: S102 - the README's own code
        os.chdir(here)
    text = printed.getvalue().replace(str(tmp / "work") + os.sep, "")  # paths relative to the example's folder
    print(text, end="")
    if args.out:
        args.out.write_text(f"# python -m benchmarks.readme_example --out {args.out}\n" + text)


if __name__ == "__main__":
    main()
