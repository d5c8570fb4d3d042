//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2): pre-norm blocks of GQA
//! attention with RoPE and a SwiGLU MLP, an optional tied LM head. Built from our kernels so
//! that only what a method makes trainable gets gradients.

use super::config::ModelConfig;
use super::block_site::{BlockSite, BlockSiteInfo};
use super::kv_cache::{KvCache, RowCache};
use super::linear::{ForwardCtx, Linear, SiteInfo};
use crate::error::{Error, Result};
use crate::kernels::{self, FrozenWeight, RopeTables};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// RoPE tables are precomputed up to this many positions at most (longer contexts than this
/// are not trained on a CPU).
const MAX_ROPE_TABLE: usize = 65536;

/// The block a tensor or site belongs to, from its Hugging Face name (`model.layers.<i>.…`);
/// `None` outside the blocks (embedding, final norm, head).
pub fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

pub struct Block {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// The MLP sub-block as a whole (`model.layers.<i>.mlp`), for branches beside it.
    pub mlp_site: BlockSite,
}

impl Block {
    fn linears(&self) -> [&Linear; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

pub struct Llama {
    pub config: ModelConfig,
    pub embed_tokens: FrozenWeight,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<FrozenWeight>,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    rope: Arc<RopeTables>,
}

/// Where [`Llama::from_weights`] takes the model's tensors from: dense f32 tensors by Hugging
/// Face name, and optionally matrices kept in GGUF blocks (linear and embedding weights of a
/// quantized GGUF), which take precedence.
struct Source<'a> {
    dense: &'a mut HashMap<String, Tensor>,
    blocks: &'a mut HashMap<String, FrozenWeight>,
    path: &'a Path,
}

impl Source<'_> {
    /// Takes dense tensor `name`, checking its shape; errors name the model file.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .dense
            .remove(name)
            .ok_or_else(|| Error::format(self.path, format!("tensor `{name}` is missing")))?;
        if t.dims() != shape {
            return Err(Error::format(self.path, format!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), shape)));
        }
        Ok(t)
    }

    /// Takes matrix `name` as a frozen weight, from the block map or the dense one.
    fn take_frozen(&mut self, name: &str, rows: usize, cols: usize) -> Result<FrozenWeight> {
        match self.blocks.remove(name) {
            Some(w) if w.dims() != (rows, cols) => {
                Err(Error::format(self.path, format!("tensor `{name}` has shape {:?}, expected {:?}", w.dims(), (rows, cols))))
            }
            Some(w) => Ok(w),
            None => Ok(FrozenWeight::from_tensor(&self.take(name, &[rows, cols])?)?),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.dense.contains_key(name) || self.blocks.contains_key(name)
    }
}

impl Llama {
    /// Builds the model from Hugging Face-named f32 tensors, consuming those it uses.
    pub fn from_weights(config: ModelConfig, w: &mut HashMap<String, Tensor>, src: &Path) -> Result<Self> {
        Self::from_mixed_weights(config, w, &mut HashMap::new(), src)
    }

    /// As [`Llama::from_weights`], with some matrices already in frozen (e.g. quantized) form.
    pub fn from_mixed_weights(
        config: ModelConfig,
        dense: &mut HashMap<String, Tensor>,
        blocks: &mut HashMap<String, FrozenWeight>,
        src: &Path,
    ) -> Result<Self> {
        let mut w = Source { dense, blocks, path: src };
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        // Not `with_capacity(num_hidden_layers)`: the count comes from the file, and the loop
        // below stops at the first missing tensor, so only layers that exist take memory.
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, out_f: usize, in_f: usize, bias: bool| -> Result<Linear> {
                let full = format!("{p}.{name}");
                let weight = w.take_frozen(&format!("{full}.weight"), out_f, in_f)?;
                // A bias the config does not announce is still read where the file has one (a
                // merged SSF adapter adds biases; transformers' `mlp_bias` models have them too).
                let bias_name = format!("{full}.bias");
                let bias = if bias || w.contains(&bias_name) { Some(w.take(&bias_name, &[out_f])?) } else { None };
                Ok(Linear::new(full, weight, bias))
            };
            let ab = c.attention_bias;
            let block = Block {
                q_proj: lin("self_attn.q_proj", q_out, d, ab)?,
                k_proj: lin("self_attn.k_proj", kv_out, d, ab)?,
                v_proj: lin("self_attn.v_proj", kv_out, d, ab)?,
                o_proj: lin("self_attn.o_proj", d, q_out, false)?,
                gate_proj: lin("mlp.gate_proj", c.intermediate_size, d, false)?,
                up_proj: lin("mlp.up_proj", c.intermediate_size, d, false)?,
                down_proj: lin("mlp.down_proj", d, c.intermediate_size, false)?,
                input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[d])?,
                post_attention_layernorm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                mlp_site: BlockSite::new(format!("{p}.mlp"), d),
            };
            layers.push(block);
        }
        let embed_tokens = w.take_frozen("model.embed_tokens.weight", c.vocab_size, d)?;
        let lm_head = match (w.contains("lm_head.weight"), c.tie_word_embeddings) {
            (true, false) => Some(w.take_frozen("lm_head.weight", c.vocab_size, d)?),
            (_, true) => None,
            (false, false) => {
                return Err(Error::format(src, "tensor `lm_head.weight` is missing and the config does not tie it to the embedding"))
            }
        };
        let norm = w.take("model.norm.weight", &[d])?;
        let table_len = c.max_position_embeddings.clamp(1, MAX_ROPE_TABLE);
        let rope = RopeTables::new(&c.rope_inv_freq(), table_len);
        Ok(Self { config, embed_tokens, lm_head, layers, norm, rope })
    }

    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// The LM head weight `[vocab, hidden]` (the embedding when tied).
    pub fn head_weight(&self) -> &FrozenWeight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|b| b.linears())
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|b| b.linears_mut())
    }

    pub fn sites(&self) -> Vec<SiteInfo> {
        self.linears().map(Linear::info).collect()
    }

    /// The base model's parameters: embedding, untied head, linear weights and biases, norms.
    pub fn parameter_count(&self) -> usize {
        let dims = |w: &FrozenWeight| w.dims().0 * w.dims().1;
        let linears: usize = self.linears().map(|l| dims(&l.weight) + l.bias.as_ref().map_or(0, |b| b.elem_count())).sum();
        let norms = (2 * self.layers.len() + 1) * self.config.hidden_size;
        dims(&self.embed_tokens) + self.lm_head.as_ref().map_or(0, dims) + linears + norms
    }

    pub fn block_sites(&self) -> Vec<BlockSiteInfo> {
        self.layers.iter().map(|b| b.mlp_site.info.clone()).collect()
    }

    pub fn block_sites_mut(&mut self) -> impl Iterator<Item = &mut BlockSite> {
        self.layers.iter_mut().map(|b| &mut b.mlp_site)
    }

    /// Every base tensor under its Hugging Face name, in f32 (dequantized where stored in
    /// blocks): the layout a merged export writes.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.weight_refs().into_iter().map(|(name, w)| Ok((name, w.to_tensor()?))).collect()
    }

    /// [`Llama::named_weights`] unread: each tensor is dequantized (or copied) only when asked,
    /// so that an export holds one f32 tensor at a time beside the model.
    pub fn weight_refs(&self) -> Vec<(String, WeightRef<'_>)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), WeightRef::Frozen(&self.embed_tokens))];
        for (i, b) in self.layers.iter().enumerate() {
            for l in b.linears() {
                out.push((format!("{}.weight", l.name), WeightRef::Frozen(&l.weight)));
                if let Some(bias) = &l.bias {
                    out.push((format!("{}.bias", l.name), WeightRef::Dense(bias)));
                }
            }
            out.push((format!("model.layers.{i}.input_layernorm.weight"), WeightRef::Dense(&b.input_layernorm)));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), WeightRef::Dense(&b.post_attention_layernorm)));
        }
        out.push(("model.norm.weight".to_string(), WeightRef::Dense(&self.norm)));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), WeightRef::Frozen(h)));
        }
        out
    }

    /// Replaces base tensor `name` (one of [`Llama::named_weights`]' names) with `t` (f32,
    /// the same shape): how a combination of fine-tunes (`ferrotune combine`) lands in a model
    /// that the merged exports then write.
    pub fn set_named_weight(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let shape_error = |want: Vec<usize>| Error::Model(format!("tensor `{name}` has shape {:?}, expected {want:?}", t.dims()));
        let frozen = |old: &FrozenWeight| -> Result<FrozenWeight> {
            let (r, c) = old.dims();
            if t.dims() != [r, c] {
                return Err(shape_error(vec![r, c]));
            }
            Ok(FrozenWeight::from_tensor(t)?)
        };
        let dense = |old: &Tensor| -> Result<Tensor> {
            if t.dims() != old.dims() {
                return Err(shape_error(old.dims().to_vec()));
            }
            Ok(t.clone())
        };
        match name {
            "model.embed_tokens.weight" => self.embed_tokens = frozen(&self.embed_tokens)?,
            "model.norm.weight" => self.norm = dense(&self.norm)?,
            "lm_head.weight" if self.lm_head.is_some() => self.lm_head = Some(frozen(self.lm_head.as_ref().expect("checked"))?),
            _ => {
                for (i, b) in self.layers.iter_mut().enumerate() {
                    if name == format!("model.layers.{i}.input_layernorm.weight") {
                        b.input_layernorm = dense(&b.input_layernorm)?;
                        return Ok(());
                    }
                    if name == format!("model.layers.{i}.post_attention_layernorm.weight") {
                        b.post_attention_layernorm = dense(&b.post_attention_layernorm)?;
                        return Ok(());
                    }
                }
                let lin = self.linears_mut().find(|l| name.strip_prefix(l.name.as_str()).is_some_and(|rest| rest == ".weight" || rest == ".bias"));
                match lin {
                    Some(l) if name.ends_with(".weight") => l.weight = frozen(&l.weight)?,
                    Some(l) => match &l.bias {
                        Some(b) => l.bias = Some(dense(b)?),
                        None => return Err(Error::Model(format!("tensor `{name}`: the module has no bias"))),
                    },
                    None => return Err(Error::Model(format!("tensor `{name}` is not a tensor of this model"))),
                }
            }
        }
        Ok(())
    }

    /// Rounds every f32 frozen matrix (linear layers, embedding, head) to bf16; matrices kept
    /// in other block types stay as they are.
    pub fn frozen_to_bf16(&mut self) -> Result<()> {
        let to_bf16 = |w: &mut FrozenWeight| -> Result<()> {
            if w.dtype_name() == "F32" {
                *w = w.to_bf16()?;
            }
            Ok(())
        };
        to_bf16(&mut self.embed_tokens)?;
        if let Some(h) = self.lm_head.as_mut() {
            to_bf16(h)?;
        }
        for l in self.linears_mut() {
            to_bf16(&mut l.weight)?;
        }
        Ok(())
    }

    /// Bytes the frozen matrices occupy (as stored).
    pub fn frozen_bytes(&self) -> usize {
        self.embed_tokens.storage_bytes()
            + self.lm_head.as_ref().map_or(0, FrozenWeight::storage_bytes)
            + self.linears().map(|l| l.weight.storage_bytes()).sum::<usize>()
    }

    /// Rows of the embedding for `ids`, `[ids.len(), hidden]`.
    fn embed(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let d = self.config.hidden_size;
        let mut x = vec![0f32; ids.len() * d];
        for (row, &id) in x.chunks_mut(d).zip(ids) {
            self.embed_tokens.rows_into(id as usize, row);
        }
        Tensor::from_vec(x, (ids.len(), d), self.device())
    }

    /// Final-norm hidden states `[b·t, hidden]` for token ids `[b, t]` (row-major). With a
    /// cache, the ids continue the cached positions and the cache is extended.
    pub fn hidden(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        self.final_norm(&self.residual(ids, b, t, cache, ctx)?)
    }

    /// The residual stream after the last block for given input embeddings `x: [b, t, hidden]`
    /// (objectives that change the inputs: Masked Thought, IFT); no cache.
    pub fn residual_from(&self, x: Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let mut x = x;
        for li in 0..self.layers.len() {
            x = self.block_forward(li, &x, 0, None, ctx)?;
        }
        Ok(x)
    }

    /// The mean of the token embeddings over the vocabulary, `[hidden]`.
    pub fn mean_embedding(&self) -> Vec<f32> {
        let (vocab, d) = (self.config.vocab_size, self.config.hidden_size);
        let mut sum = vec![0f64; d];
        let mut row = vec![0f32; d];
        for id in 0..vocab {
            self.embed_tokens.rows_into(id, &mut row);
            sum.iter_mut().zip(&row).for_each(|(s, &v)| *s += v as f64);
        }
        sum.iter().map(|s| (s / vocab as f64) as f32).collect()
    }

    /// The residual stream after the last block, `[b, t, hidden]` (before the final norm).
    pub fn residual(&self, ids: &[u32], b: usize, t: usize, mut cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let pos0 = cache.as_ref().map_or(0, |k| k.len());
        let mut x = self.embed_ids(ids, b, t)?;
        for li in 0..self.layers.len() {
            x = self.block_forward(li, &x, pos0, cache.as_deref_mut(), ctx)?;
        }
        Ok(x)
    }

    /// The residual stream entering the first block, `[b, t, hidden]`.
    pub fn embed_ids(&self, ids: &[u32], b: usize, t: usize) -> candle_core::Result<Tensor> {
        let c = &self.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({})", c.vocab_size);
        }
        self.embed(ids)?.reshape((b, t, c.hidden_size))
    }

    /// Block `li` applied to the residual stream `x: [b, t, hidden]` at positions from `pos0`
    /// (packed rows: at the positions `ctx` gives, with attention kept inside each example).
    pub fn block_forward(&self, li: usize, x: &Tensor, pos0: usize, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if cache.is_none() && pos0 == 0 {
            if let Some(y) = self.fused_block(li, x, ctx)? {
                return Ok(y);
            }
        }
        if let Some(positions) = &ctx.positions {
            if cache.is_some() || pos0 != 0 {
                candle_core::bail!("packed rows are a training input: they cannot continue a KV cache");
            }
            return self.block_with(li, x, ctx, |q, k, v| {
                let q = kernels::rope_positions(&q, &self.rope, positions)?;
                let k = kernels::rope_positions(&k, &self.rope, positions)?;
                kernels::packed_causal_attention(&q, &k, &v, positions)
            });
        }
        self.block_with(li, x, ctx, |q, k, v| {
            let q = kernels::rope(&q, &self.rope, pos0)?;
            let mut k = kernels::rope(&k, &self.rope, pos0)?;
            let mut v = v;
            if let Some(cache) = cache {
                if let Some((pk, pv)) = &cache.layers[li] {
                    k = Tensor::cat(&[pk, &k], 1)?;
                    v = Tensor::cat(&[pv, &v], 1)?;
                }
                cache.layers[li] = Some((k.clone(), v.clone()));
            }
            kernels::causal_attention(&q, &k, &v)
        })
    }

    /// Block `li` as the two fused training sublayers ([`kernels::decoder_block`]), where
    /// that computes the same as [`Llama::block_with`]: a training forward whose LoRA
    /// gradients a sink collects, every site plain or LoRA, nothing beside the MLP, norms
    /// frozen. `None` otherwise. `FERROTUNE_FUSED_BLOCK=0` switches it off.
    fn fused_block(&self, li: usize, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Option<Tensor>> {
        let blk = &self.layers[li];
        if !kernels::decoder_block::enabled() || !ctx.train || !kernels::grad_sink::is_open() || blk.mlp_site.hook.is_some() {
            return Ok(None);
        }
        if blk.input_layernorm.track_op() || blk.post_attention_layernorm.track_op() {
            return Ok(None);
        }
        let [Some(q), Some(k), Some(v), Some(o), Some(gate), Some(up), Some(down)] = blk.linears().map(|l| l.fused_projection(ctx)) else {
            return Ok(None);
        };
        let c = &self.config;
        let heads = [c.num_attention_heads, c.num_key_value_heads, c.head_dim];
        let x = kernels::decoder_block::attention_sublayer(x, &blk.input_layernorm, c.rms_norm_eps, [&q, &k, &v, &o], heads, &self.rope, ctx.positions.as_ref())?;
        kernels::decoder_block::mlp_sublayer(&x, &blk.post_attention_layernorm, c.rms_norm_eps, [&gate, &up, &down]).map(Some)
    }

    /// Block `li` with its attention core supplied: `attend(q, k, v)` gets the projections
    /// `[b, t, heads, head_dim]` before RoPE and returns the attention output in `q`'s shape.
    fn block_with(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &ForwardCtx,
        attend: impl FnOnce(Tensor, Tensor, Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let blk = &self.layers[li];
        let (b, t, _) = x.dims3()?;
        let h = kernels::rms_norm(x, &blk.input_layernorm, c.rms_norm_eps)?;
        let q = blk.q_proj.forward(&h, ctx)?.reshape((b, t, c.num_attention_heads, c.head_dim))?;
        let k = blk.k_proj.forward(&h, ctx)?.reshape((b, t, c.num_key_value_heads, c.head_dim))?;
        let v = blk.v_proj.forward(&h, ctx)?.reshape((b, t, c.num_key_value_heads, c.head_dim))?;
        let a = attend(q, k, v)?.reshape((b, t, c.num_attention_heads * c.head_dim))?;
        let x = (x + blk.o_proj.forward(&a, ctx)?)?;
        let h = kernels::rms_norm(&x, &blk.post_attention_layernorm, c.rms_norm_eps)?;
        let m = kernels::swiglu(&blk.gate_proj.forward(&h, ctx)?, &blk.up_proj.forward(&h, ctx)?)?;
        let mlp_out = blk.mlp_site.apply(&x, blk.down_proj.forward(&m, ctx)?, ctx)?;
        x + mlp_out
    }

    /// One decoding step of a batch whose rows sit at different positions: `ids[i]` is row
    /// `i`'s next token, placed at position `cache.lens()[i]`; the cache gains one position
    /// per row. Returns the logits `[rows, vocab]` of the token after it. Weights in Q4_0,
    /// Q4_1, Q8_0, Q4_K or Q6_K blocks multiply int8-quantized activations here, as llama.cpp
    /// decodes (`kernels::q8_dot`). Runs on a pool worker: a step makes a few hundred small
    /// parallel calls ([`crate::runtime::on_pool`]).
    pub fn decode_step(&self, ids: &[u32], cache: &mut RowCache, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        crate::runtime::on_pool(|| kernels::with_int8_activations(|| self.decode_rows(ids, cache, ctx)))
    }

    fn decode_rows(&self, ids: &[u32], cache: &mut RowCache, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let b = ids.len();
        if b != cache.rows() {
            candle_core::bail!("decode step: {b} tokens for a cache of {} rows", cache.rows());
        }
        let starts = cache.lens().to_vec();
        let lens: Vec<usize> = starts.iter().map(|n| n + 1).collect();
        let shape = kernels::DecodeShape { hq: c.num_attention_heads, hkv: c.num_key_value_heads, d: c.head_dim, cap: cache.capacity() };
        let mut x = self.embed_ids(ids, b, 1)?;
        for li in 0..self.layers.len() {
            x = self.block_with(li, &x, ctx, |q, k, v| {
                let q: Vec<f32> = kernels::rope_at(&q, &self.rope, &starts)?.flatten_all()?.to_vec1()?;
                let k: Vec<f32> = kernels::rope_at(&k, &self.rope, &starts)?.flatten_all()?.to_vec1()?;
                let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
                cache.write(li, &k, &v).map_err(candle_core::Error::wrap)?;
                let (kc, vc) = cache.layer(li);
                let out = kernels::decode_attention(&q, kc, vc, &lens, shape);
                Tensor::from_vec(out, (b, 1, c.num_attention_heads, c.head_dim), self.device())
            })?;
        }
        cache.advance();
        kernels::lm_head_logits(&self.final_norm(&x)?, self.head_weight())
    }

    /// The final norm over the last block's output, flattened to `[b·t, hidden]`.
    pub fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        kernels::rms_norm(x, &self.norm, self.config.rms_norm_eps)?.reshape((b * t, d))
    }

    /// Per-position NLL `[b·t]` of next-token `targets` (−100 = ignored).
    pub fn nll(&self, ids: &[u32], targets: Arc<Vec<i32>>, b: usize, t: usize, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.head_nll(&self.residual(ids, b, t, None, ctx)?, targets, ctx)
    }

    /// The final norm, LM head and per-position NLL over the last block's output `x: [b, t,
    /// hidden]`; the gradient w.r.t. `x` is prepared only when training.
    pub fn head_nll(&self, x: &Tensor, targets: Arc<Vec<i32>>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        kernels::lm_head_nll(&self.final_norm(x)?, self.head_weight(), targets, ctx.train)
    }

    /// Logits `[b·t, vocab]`; used for generation and checks, never for training.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let h = self.hidden(ids, b, t, cache, ctx)?;
        kernels::lm_head_logits(&h, self.head_weight())
    }
}

/// One base tensor of [`Llama::weight_refs`], read when asked.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    Frozen(&'a FrozenWeight),
    Dense(&'a Tensor),
}

impl WeightRef<'_> {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            WeightRef::Frozen(w) => vec![w.dims().0, w.dims().1],
            WeightRef::Dense(t) => t.dims().to_vec(),
        }
    }

    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(match self {
            WeightRef::Frozen(w) => w.to_tensor()?,
            WeightRef::Dense(t) => (*t).clone(),
        })
    }

    /// The values in f32, row-major.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self {
            WeightRef::Frozen(w) => w.to_f32_vec(),
            WeightRef::Dense(t) => t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?,
        })
    }
}
