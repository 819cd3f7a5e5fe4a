"""Forward processes: flow-matching probability paths, training-time samplers and the diffusion noise schedule.

The bottom of the package stack, so that the losses and the samplers that share this math both import it downward.
"""
