"""analysis: co-occurrence, domain specificity, neuron profiles, label prompts and
LLM labeling, from the lake's derived tables."""
