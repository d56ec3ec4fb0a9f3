"""Export a student as a Hugging Face model folder (``retnet-distill export``).

``configuration_retnet_student.py`` and ``modeling_retnet_student.py`` are templates copied into the
export folder and loaded there with ``trust_remote_code=True``: they import only torch, transformers and
the standard library. ``export.py`` writes the folder.
"""
