"""The README and docs/ stay true: every link leads to a file (and heading) that exists, and every
`scripts/train.py` and `scripts/evaluate.py` command the README shows composes and passes the
script's own checks, so a renamed key or option cannot leave the guide behind."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from discrete_vae.checks import check_config, known_keys
from discrete_vae.cli import normalize_overrides

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_somewhere(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked.read_text()), f"{page.name} links to {target}: no such heading"


def readme_commands(script: str) -> list[list[str]]:
    """The README's `python scripts/<script>` commands (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", f"scripts/{script}"] and "--help" not in words:
                commands.append(words[2:])
    return commands


def test_the_readme_shows_training_and_evaluation():
    assert len(readme_commands("train.py")) >= 4 and readme_commands("evaluate.py")


@pytest.mark.parametrize("args", readme_commands("train.py"), ids=" ".join)
def test_the_readmes_training_commands_pass_train_pys_checks(args, tmp_path, monkeypatch):
    """Each command as train.py composes it (a sweep's first job: the first value of each list); the
    extension's, with the user's folder made from docs/extending.md beside a project folder."""
    if any("$PWD/../my_parts" in a for a in args):
        from test_extending import doc_block

        for name in ("my_parts.py", "conf/latent/ordinal.yaml", "conf/estimator/plain_reinforce.yaml"):
            (tmp_path / "my_parts" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "my_parts" / name).write_text(doc_block(f"my_parts/{name}"))
        monkeypatch.syspath_prepend(str(tmp_path / "my_parts"))
        args = [a.replace("$PWD", str(tmp_path / "project")) for a in args]
    overrides = [a.split(",")[0] if "=" in a and not a.startswith(("hydra.", "upper_latents")) else a
                 for a in args if a != "-m"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=normalize_overrides(overrides))
    check_config(cfg)
    if cfg.latent._target_.startswith("my_parts."):
        from discrete_vae.build import build_module

        build_module(cfg)  # the user's classes import, and the estimator takes the latent type


@pytest.mark.parametrize("args", readme_commands("evaluate.py"), ids=" ".join)
def test_the_readmes_evaluation_commands_use_evaluate_pys_options(args):
    keys = {a.split("=", 1)[0] for a in args}
    assert "ckpt_path" in keys and keys <= known_keys("evaluate"), keys - known_keys("evaluate")


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S))
def test_the_readmes_python_runs_as_written(block):
    """What a reader pastes runs: each python block of the README, in a namespace of its own."""
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
