"""Generation and judging: K sampled completions per prompt, the judges (a win rate between two models' answers,
a score for each completion), and the pairs or ranked groups selected from them."""
