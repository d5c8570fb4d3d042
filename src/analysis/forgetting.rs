//! Forgetting probes (METHODS.md §8.3): the loss of the pre-trained and the fine-tuned model
//! on texts the fine-tune was not about (general text, or the task in a "conjugate" form such
//! as another language), file by file and example by example. A loss that rises on general
//! text is forgetting; a task whose conjugate form keeps the pre-trained loss points to a
//! fine-tune that changed which task the model infers rather than erasing the capability.

use crate::train::eval::ExampleNll;
use serde::Serialize;

/// How one file's loss moved.
#[derive(Debug, Clone, Serialize)]
pub struct FileForgetting {
    pub file: String,
    pub examples: usize,
    pub tokens: usize,
    /// Mean NLL per target token, pre-trained model.
    pub loss_before: f64,
    /// The same for the fine-tuned model.
    pub loss_after: f64,
    /// `loss_after − loss_before`: positive = forgotten.
    pub change: f64,
    /// `exp(change)`: the factor perplexity was multiplied by.
    pub perplexity_ratio: f64,
    /// Share of examples whose mean loss rose.
    pub examples_worse: f64,
    /// The examples whose mean loss rose most (at most [`WORST`]).
    pub most_forgotten: Vec<ExampleChange>,
}

/// One example's mean loss, before and after.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleChange {
    /// 0-based position among the file's scored examples.
    pub index: usize,
    pub tokens: usize,
    pub loss_before: f64,
    pub loss_after: f64,
}

/// How many of the most-forgotten examples a file's report lists.
pub const WORST: usize = 5;

/// Compares the per-example NLLs of the same examples under the two models.
pub fn compare(file: &str, before: &[ExampleNll], after: &[ExampleNll]) -> FileForgetting {
    assert_eq!(before.len(), after.len(), "the same examples are scored by both models");
    let tokens: usize = before.iter().map(|e| e.tokens).sum();
    let mean = |v: &[ExampleNll]| v.iter().map(|e| e.nll_sum).sum::<f64>() / tokens.max(1) as f64;
    let (loss_before, loss_after) = (mean(before), mean(after));
    let mut changes: Vec<ExampleChange> = before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, _))| b.tokens > 0)
        .map(|(index, (b, a))| ExampleChange { index, tokens: b.tokens, loss_before: b.nll_sum / b.tokens as f64, loss_after: a.nll_sum / a.tokens as f64 })
        .collect();
    let scored = changes.len().max(1);
    let worse = changes.iter().filter(|c| c.loss_after > c.loss_before).count();
    changes.sort_by(|x, y| (y.loss_after - y.loss_before).total_cmp(&(x.loss_after - x.loss_before)));
    changes.truncate(WORST);
    changes.retain(|c| c.loss_after > c.loss_before);
    FileForgetting {
        file: file.to_string(),
        examples: before.len(),
        tokens,
        loss_before,
        loss_after,
        change: loss_after - loss_before,
        perplexity_ratio: (loss_after - loss_before).exp(),
        examples_worse: worse as f64 / scored as f64,
        most_forgotten: changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nll(v: &[(f64, usize)]) -> Vec<ExampleNll> {
        v.iter().map(|&(nll_sum, tokens)| ExampleNll { nll_sum, tokens }).collect()
    }

    #[test]
    fn token_weighted_losses_and_the_examples_that_got_worse() {
        let before = nll(&[(2.0, 2), (3.0, 1), (0.0, 0), (4.0, 4)]);
        let after = nll(&[(4.0, 2), (1.5, 1), (0.0, 0), (8.0, 4)]);
        let f = compare("x", &before, &after);
        assert_eq!((f.examples, f.tokens), (4, 7));
        assert!((f.loss_before - 9.0 / 7.0).abs() < 1e-12 && (f.loss_after - 13.5 / 7.0).abs() < 1e-12);
        assert!((f.perplexity_ratio - (4.5f64 / 7.0).exp()).abs() < 1e-12);
        // Three scored examples (the empty one is not), two of them worse.
        assert!((f.examples_worse - 2.0 / 3.0).abs() < 1e-12);
        let order: Vec<usize> = f.most_forgotten.iter().map(|c| c.index).collect();
        assert_eq!(order, [0, 3], "+1.0 then +1.0 by mean loss, the improved example left out");
    }
}
