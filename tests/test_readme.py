"""The README's Python snippets run as written, in order, in one namespace (as a reader would
paste them): a stale name or signature in the docs fails here."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_snippets():
    assert len(_python_blocks()) >= 6


def test_readme_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile.mkdtemp in the snippets
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict = {}
    for i, block in enumerate(_python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # name the block: the traceback's line numbers are the block's
            raise AssertionError(f"README python block {i} failed:\n{block}") from exc
    # the last two snippets trained a step: gradients reached the K expert heads, then the K
    # LoRA experts of the backbone
    assert namespace["policy"].heads.grad is not None
    # (a fresh B is zero, so A's first gradient is zero too: B's is the one that must move)
    grads = {n: p.grad for n, p in namespace["lora_policy"].named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
