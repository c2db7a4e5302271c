"""Prepare what scripts/gpu_session.sh needs on the GPU machine and cannot fetch there.

    python scripts/prepare_gpu_carry.py

.gpu/tokenizer: the Qwen2 tokenizer (written by transformers from the demo GGUF) for the tiny test checkpoints;
.whl/: the gguf wheel (the GPU image lacks it). Both folders are git-ignored via .git/info/exclude.
"""
import os
import subprocess
import sys

from transformers import AutoTokenizer

from qwen2_triton.model.demo import demo_model_path

root = os.path.join(os.path.dirname(__file__), "..")
path = demo_model_path()
AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(
    os.path.join(root, ".gpu", "tokenizer"))
subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                os.path.join(root, ".whl"), "gguf"], check=True)
