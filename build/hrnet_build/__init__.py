"""The build pipeline: PaddleClas weights -> Paddle inference model -> ONNX (-> TensorRT plan).

One module per stage: ``network`` (the HRNet classifier in Paddle), ``weights`` (where
weights come from), ``calibrate`` (offline weights), ``export`` (Paddle -> ONNX with its
parity gate). Paddle, paddle2onnx and ONNX Runtime are imported only where they are used.
"""
