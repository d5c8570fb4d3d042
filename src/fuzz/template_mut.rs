//! Chat-template mutation: splice Jinja fragments into real templates. The fragments are the
//! constructs that can make a renderer misbehave (Python string methods with odd arguments,
//! `tojson` options, huge ranges and repetitions, recursion, unknown names and filters).

use super::mutate::{below, havoc, one_in, pick};
use crate::rng::SplitMix64;

const FRAGMENTS: [&str; 34] = [
    "{{ messages[0]['content'].split(',') }}",
    "{{ messages[0].content.strip('xyz') }}",
    "{{ messages[0].content.rsplit(none, -1) }}",
    "{{ messages[0].content.replace('', '-', 3) }}",
    "{{ messages[0].content.center(99999999) }}",
    "{{ messages[0].content.zfill(-1) }}",
    "{{ messages[0].content.startswith(('a', 1)) }}",
    "{{ messages[0].content.find('x', 99999999999) }}",
    "{{ messages[0].content.count('') }}",
    "{{ messages[0].content[::-1] }}",
    "{{ messages[-999] }}",
    "{{ messages | tojson(indent=99999) }}",
    "{{ messages | tojson(indent=-5) }}",
    "{{ messages | tojson(separators=(',', ':'), sort_keys=true) }}",
    "{{ 1e308 * 10 | tojson }}",
    "{{ strftime_now('%Y-%m-%d %H %j %a %b %%') }}",
    "{{ strftime_now('%Q%') }}",
    "{{ raise_exception('stop') }}",
    "{% for i in range(99999999) %}{{ i }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'ab' * 99999999 }}",
    "{{ 'ab' * 9999 * 9999 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% set ns = namespace(x=0) %}{% set ns.x = ns.x + 1 %}{{ ns.x }}",
    "{{ undefined_name.attr }}",
    "{{ messages | nosuchfilter }}",
    "{{ messages[0].items() | list }}",
    "{{ {'a': 1}.get('a', 2) }}{{ {'a': 1}.keys() }}",
    "{% if %}",
    "{{ 9223372036854775807 + 1 }}",
    "{{ 1 // 0 }}",
    "{{ -9223372036854775808 // -1 }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{{ bos_token ~ eos_token }}{% generation %}x{% endgeneration %}",
];

/// One mutated template.
pub fn mutate(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(2) {
        let at = below(rng, out.len() + 1);
        // Only insert at a char boundary so the mutation is a template edit, not an encoding one.
        let at = (0..=at).rev().find(|&i| std::str::from_utf8(&out[..i]).is_ok()).unwrap_or(0);
        match rng.below(4) {
            0..=2 => {
                let frag = pick(rng, &FRAGMENTS).as_bytes().to_vec();
                out.splice(at..at, frag);
            }
            _ => {
                // Drop a tag's closing half, or duplicate an opening one.
                let tag = *pick(rng, &[&b"{%"[..], b"%}", b"{{", b"}}", b"{% endfor %}", b"{% endif %}"]);
                out.splice(at..at, tag.iter().copied());
            }
        }
    }
    if one_in(rng, 4) {
        havoc(rng, &mut out, others);
    }
    out
}
