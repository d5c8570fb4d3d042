//! The PNGs a run writes are real images: `loss.png` decodes as an RGB image of the stated
//! size, with the training and evaluation curves drawn in their colours on white.

mod common;

#[test]
fn a_run_draws_its_losses() {
    use common::contract::{plan, Promise};
    let d = tempfile::tempdir().unwrap();
    let mut cfg =
        plan(d.path(), &Promise { adapter: "lora", extra: "eval_steps = 2", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true }, 6);
    cfg.save_steps = 0;
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let png = d.path().join("out").join(ferrotune::train::run_dir::LOSS_PLOT);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), ferrotune::train::metrics::LOSS_PLOT_SIZE);
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixels: Vec<[u8; 3]> = buf[..info.buffer_size()].chunks(3).map(|p| [p[0], p[1], p[2]]).collect();
    let white = pixels.iter().filter(|p| **p == [255, 255, 255]).count();
    assert!(white > pixels.len() / 2, "a white background");
    // Palette99's first two colours, the training and the evaluation line.
    for (i, name) in [(0usize, "training"), (1, "evaluation")] {
        use plotters::style::{Color, Palette, Palette99};
        let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
        let n = pixels.iter().filter(|p| **p == [r, g, b]).count();
        assert!(n > 200, "the {name} loss is drawn ({n} pixels of its colour)");
    }
}
