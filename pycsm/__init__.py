"""pycsm: Sesame's CSM-1B text-to-speech on ggml.

>>> import pycsm
>>> with pycsm.CSM.from_pretrained(quant="q8_0") as tts:     # or pycsm.CSM("csm-1b-q8_0.gguf")
...     tts.generate("Hello from pycsm.", seed=42).save("hello.wav")

`CSM` speaks text (`generate`, `stream`, `generate_long`, `generate_batch`); `Segment` is voice
context; `Audio` is the result. `Model` / `quantize` / `convert` are the lower-level pieces behind
`pycsm info`, `pycsm quantize` and `pycsm convert`.
"""

from . import _native
from .api import CSM, AudioStream, Segment
from .audio import Audio
from .convert import convert
from .errors import CSMError
from .model import Model, quantize, set_log_callback, system_info
from .options import GenerationOptions
from .voices import Voice

__version__ = _native.lib.csm_version().decode()

__all__ = ["CSM", "Audio", "AudioStream", "Segment", "CSMError", "Model", "quantize", "convert",
           "set_log_callback", "system_info", "__version__", "GenerationOptions", "Voice"]
