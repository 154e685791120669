"""pycsm: Sesame's CSM-1B text-to-speech on ggml (distributed as `pycsm-tts`).

>>> import pycsm
>>> with pycsm.CSM.from_pretrained(quant="q8_0") as tts:     # or pycsm.CSM("csm-1b-q8_0.gguf")
...     tts.generate("Hello from pycsm.", seed=42).save("hello.wav")

`CSM` speaks text (`generate`, `stream`, `generate_long`, `generate_batch`); `Segment` is voice
context; `Audio` is the result. `Model` / `quantize` and the module `pycsm.convert`
(`pycsm.convert.convert(checkpoint_dir, out_path)`, needs the `[convert]` extra) are the lower-level
pieces behind `pycsm info`, `pycsm quantize` and `pycsm convert`.
"""

# The one place the version is written: pyproject.toml reads it with scikit-build-core's regex
# provider and CMakeLists.txt with file(STRINGS), so the wheel, this attribute and csm_version() agree.
__version__ = "0.1.0"

from . import convert
from .api import CSM, AudioStream, Segment
from .audio import Audio
from .errors import CSMError
from .model import Model, quantize, set_log_callback, system_info
from .options import GenerationOptions
from .voices import Voice

__all__ = ["CSM", "Audio", "AudioStream", "Segment", "CSMError", "Model", "quantize", "convert",
           "set_log_callback", "system_info", "__version__", "GenerationOptions", "Voice"]
