"""Backend names, shared by the library and the command line. Nothing heavy is imported here, so
the CLI's flags cost no import of torch."""

GRAPH_BACKENDS = ("onnxruntime", "tensorrt")  # run the exported graphs (ONNX, or engines built from them)
BACKENDS = ("torch", *GRAPH_BACKENDS)  # every engine `Model.load` runs an artifact on
BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: see blockrt.runtime.engine.pick_backend
TENSORRT_LIBRARIES = ("tensorrt", "tensorrt-rtx")  # what `blockrt build` builds engines with
