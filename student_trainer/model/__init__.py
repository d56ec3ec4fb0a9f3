"""The RetNet student, its config, retention, retrofit and Hugging Face export."""
