"""A trivial model for measuring the load-test harness itself, not a network.

It takes the HRNet contract's input name with any spatial size (``--payload tiny`` sends 1x1
pixels) and answers a uniform distribution over the 1000 classes, so loadtest/hrnet.py's
answer checks pass. Served beside HRNet, it shows how many requests per second one Locust
process can drive (docs/loadtest.md).
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "x").as_numpy().shape[0]
            uniform = np.full((n, 1000), 1e-3, np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", uniform)]))
        return responses
