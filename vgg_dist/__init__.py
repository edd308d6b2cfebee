"""vgg_dist: train d2l's VGG with Hugging Face Accelerate. `from vgg_dist import VGG` loads a trained run."""


def __getattr__(name: str):
    # Lazy: `import vgg_dist` (every command and launcher worker does it) must not pay for huggingface_hub
    # and the data code that VGG needs.
    if name == "VGG":
        from vgg_dist.hub import VGG
        return VGG
    raise AttributeError(f"module 'vgg_dist' has no attribute {name!r}")


__all__ = ["VGG"]
