"""DocEV Preview for torchtune: architecture sizes, builders and weight conversion."""
