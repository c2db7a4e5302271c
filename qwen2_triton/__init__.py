"""qwen2-triton"""
