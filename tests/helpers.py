from pathlib import Path

from fedit import EditRequest, Resources

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"

EIFFEL = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome",
                     target_true="Paris", case_id=0)
JORDAN = EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="soccer", case_id=1)
DARRIEUX = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                       case_id=2)


def run_json(capsys, main, argv):
    """Run the CLI; it must print exactly one JSON object on stdout. Returns (exit code, object)."""
    import json

    code = main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


def resources(cache_dir: str) -> Resources:
    return Resources(cache_dir=cache_dir, corpus=str(CORPUS))


# Settings that let a random tiny model move: few stats chunks, strong steps, small λ.
FAST = {"mom2_samples": 40, "mom2_seq_len": 32, "v_num_grad_steps": 15, "context_template_length_params": [[4, 5]]}


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` (the scripts are not part of the package)."""
    import importlib.util

    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # the scripts import their shared helpers (_bench.py)
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
