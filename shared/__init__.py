"""Wire contract and file formats shared by the teacher service and the trainer.

Plain Python + numpy + msgpack: no web framework, no torch, no training code.
"""
