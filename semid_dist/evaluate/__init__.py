"""semid evaluate: a generative retriever trained on published semantic IDs and the user's
interactions (TIGER, Rajput et al. 2023), reporting Recall and NDCG on held-out interactions, so
that tokenizers can be compared by how well a recommender does with their IDs."""
