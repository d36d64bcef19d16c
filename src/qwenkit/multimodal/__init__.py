"""Multimodal inputs: loading images safely (:mod:`.image`), OpenAI chat content parts (:mod:`.chat`)."""
