"""``fedit datasets [KIND]``: where to get the full dataset files and corpora (fedit never
downloads them), and the sample each kind ships with."""

from __future__ import annotations

from fedit.cli import common

_PYTORCH_RAW = ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
                "word_language_model/data/wikitext-2/")
# Text corpora for second-moment statistics (`--corpus`), beside the dataset kinds.
CORPORA = {
    "wikitext-2": (
        "WikiText-2 (tokenized, Merity et al. 2016) as the pytorch/examples repository ships it; fedit's\n"
        "shipped corpus is a sample of it. The docs' `--corpus wikitext-2` is a folder holding:\n"
        f"  mkdir -p wikitext-2 && cd wikitext-2\n"
        f"  curl -L -O {_PYTORCH_RAW}valid.txt   (sha256 f0737ed3…58e8)\n"
        f"  curl -L -O {_PYTORCH_RAW}test.txt    (sha256 d790b833…eca0)\n"
        "Then pass `--corpus wikitext-2` (a folder: its text files are read in order).\n"),
}


def register(sub) -> None:
    from fedit.data.loaders import KINDS

    p = common.add_command(sub, "datasets", "where to get the full dataset files (this tool never downloads them)")
    p.add_argument("kind", nargs="?", default=None, choices=[*KINDS, *CORPORA],
                   help="one dataset format or corpus (default: all of them)")
    common.output_flags(p)
    p.set_defaults(run=run)


def describe(kind: str) -> dict:
    """``{"kind", "instructions", "sample", "sample_records"}`` of a dataset kind or corpus."""
    if kind in CORPORA:
        return {"kind": kind, "corpus": True, "instructions": CORPORA[kind], "sample": None}
    from fedit.data.loaders import fetch_instructions, load_records, sample_path

    return {"kind": kind, "corpus": False, "instructions": fetch_instructions(kind), "sample": str(sample_path(kind)),
            "sample_records": len(load_records(kind))}


def run(args) -> int:
    from fedit.data.loaders import KINDS

    kinds = [args.kind] if args.kind else [*KINDS, *CORPORA]
    entries = [describe(k) for k in kinds]
    text = "\n\n".join(f"{e['kind']}:\n{e['instructions'].rstrip()}" for e in entries)
    common.emit(args, {"datasets": entries}, text)
    return 0
