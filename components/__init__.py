"""KFP components: one module per pipeline step, each a thin ``@dsl.component`` over ``docev.pipeline.steps``.

Component bodies are shipped as source, so they import inside the function. ``build(image)`` binds a
step to the project image (``train.image`` of the config): the image already holds docev and kfp.
"""

from kfp import dsl


def lightweight(func, image: str):
    """``@dsl.component`` for our image: nothing installed at run time (the image pins everything)."""
    return dsl.component(func, base_image=image, install_kfp_package=False)
