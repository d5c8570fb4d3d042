//! TuCo, the tuning contribution (METHODS.md §8.1; Nuti et al., ICML 2025): how much of a
//! prompt's last-token representation the fine-tuning put there. Along the fine-tuned model's
//! residual stream `x_l`, each block is evaluated twice on the same input: the pre-trained
//! block's update `PTC_l = f_pre(x_l) − x_l` and the fine-tuning's `FTC_l = f_ft(x_l) −
//! f_pre(x_l)`. With `S_P = Σ_l PTC_l[−1]`, `S_F = Σ_l FTC_l[−1]`, `TuCo = ‖S_F‖ / (‖S_P‖ +
//! ‖S_F‖)`. Steering multiplies `FTC_l` by `κ` in the stream, `x_{l+1} = x_l + PTC_l + κ·FTC_l`,
//! written `f_ft(x_l) + (κ − 1)·FTC_l` so that `κ = 1` is the fine-tuned forward exactly.

use crate::error::Result;
use candle_core::{IndexOp, Tensor};

/// One block's share, on the last token.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TucoLayer {
    /// `‖PTC_l[−1]‖`.
    pub ptc_norm: f64,
    /// `‖FTC_l[−1]‖`.
    pub ftc_norm: f64,
    /// TuCo of the sums over blocks `0..=l`.
    pub tuco_so_far: f64,
}

pub struct Tuco {
    pub tuco: f64,
    pub layers: Vec<TucoLayer>,
    /// The (steered) residual stream after the last block, `[1, t, hidden]`.
    pub residual: Tensor,
}

fn last_token(x: &Tensor) -> Result<Vec<f64>> {
    let (_, t, _) = x.dims3()?;
    Ok(x.i((0, t - 1))?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn ratio(sp: &[f64], sf: &[f64]) -> f64 {
    let (p, f) = (norm(sp), norm(sf));
    if p + f > 0.0 {
        f / (p + f)
    } else {
        0.0
    }
}

/// TuCo of one sequence `x0: [1, t, hidden]` (its input embeddings) through `layers` blocks;
/// `pre(l, x)` and `ft(l, x)` give block `l`'s output in the pre-trained and the fine-tuned
/// model, `kappa` steers.
pub fn tuco(
    x0: Tensor,
    layers: usize,
    kappa: f64,
    mut pre: impl FnMut(usize, &Tensor) -> Result<Tensor>,
    mut ft: impl FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tuco> {
    let hidden = x0.dim(2)?;
    let (mut sp, mut sf) = (vec![0f64; hidden], vec![0f64; hidden]);
    let mut out = Vec::with_capacity(layers);
    let mut x = x0;
    for l in 0..layers {
        let p = pre(l, &x)?;
        let f = ft(l, &x)?;
        let ptc = (&p - &x)?;
        let ftc = (&f - &p)?;
        let (pl, fl) = (last_token(&ptc)?, last_token(&ftc)?);
        sp.iter_mut().zip(&pl).for_each(|(s, v)| *s += v);
        sf.iter_mut().zip(&fl).for_each(|(s, v)| *s += v);
        out.push(TucoLayer { ptc_norm: norm(&pl), ftc_norm: norm(&fl), tuco_so_far: ratio(&sp, &sf) });
        x = if kappa == 1.0 { f } else { (f + ftc.affine(kappa - 1.0, 0.0)?)? };
    }
    Ok(Tuco { tuco: ratio(&sp, &sf), layers: out, residual: x })
}
