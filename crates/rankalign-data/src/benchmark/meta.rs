//! Class names and prompt templates for zero-shot classification.
//!
//! A template holds `{c}` (CLIP_benchmark's placeholder) or `{}` (OpenAI's) where the
//! class name goes. Built in, as data files under `data/zeroshot/` (written by
//! `dump_zeroshot.py` from CLIP_benchmark's packaged JSON): `imagenet1k` (OpenAI's
//! 1,000 names and 80 templates), `cifar10` and `cifar100` (18 templates each), and
//! the 200-class subsets `imagenet-r` and `imagenet-a` (names, and their indices into
//! ImageNet-1k).

use std::path::Path;

use super::{format_err, parse_lines, read_lines};
use crate::DataError;

const BUILTIN: [(&str, &str, &str); 5] = [
    (
        "imagenet1k",
        include_str!("../../../../data/zeroshot/imagenet1k_classnames.txt"),
        include_str!("../../../../data/zeroshot/imagenet1k_templates.txt"),
    ),
    (
        "cifar10",
        include_str!("../../../../data/zeroshot/cifar10_classnames.txt"),
        include_str!("../../../../data/zeroshot/cifar10_templates.txt"),
    ),
    (
        "cifar100",
        include_str!("../../../../data/zeroshot/cifar100_classnames.txt"),
        include_str!("../../../../data/zeroshot/cifar100_templates.txt"),
    ),
    (
        "imagenet-r",
        include_str!("../../../../data/zeroshot/imagenet-r_classnames.txt"),
        include_str!("../../../../data/zeroshot/imagenet-r_templates.txt"),
    ),
    (
        "imagenet-a",
        include_str!("../../../../data/zeroshot/imagenet-a_classnames.txt"),
        include_str!("../../../../data/zeroshot/imagenet-a_templates.txt"),
    ),
];

const SUBSETS: [(&str, &str); 2] = [
    (
        "imagenet-r",
        include_str!("../../../../data/zeroshot/imagenet-r_subset.txt"),
    ),
    (
        "imagenet-a",
        include_str!("../../../../data/zeroshot/imagenet-a_subset.txt"),
    ),
];

/// The names of the built-in class lists.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|b| b.0).collect()
}

fn builtin(name: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    BUILTIN.iter().find(|b| b.0 == name)
}

/// A built-in class-name list by name.
pub fn builtin_classnames(name: &str) -> Option<Vec<String>> {
    builtin(name).map(|b| b.1.lines().map(str::to_string).collect())
}

/// A built-in template list by name.
pub fn builtin_templates(name: &str) -> Option<Templates> {
    builtin(name).map(|b| Templates(b.2.lines().map(str::to_string).collect()))
}

/// Prompt templates, each with one class-name placeholder.
#[derive(Clone, Debug, PartialEq)]
pub struct Templates(pub Vec<String>);

impl Templates {
    /// The single template CLIP_benchmark falls back to.
    pub fn default_photo() -> Self {
        Templates(vec!["a photo of a {c}.".into()])
    }

    /// Check each template has exactly one placeholder.
    pub fn validate(&self, origin: &str) -> Result<(), DataError> {
        for (i, t) in self.0.iter().enumerate() {
            let n = t.matches("{c}").count() + t.matches("{}").count();
            if n != 1 {
                return Err(DataError::Invalid(format!(
                    "{origin}: template {} ({t:?}) has {n} class placeholders; one `{{c}}` or `{{}}` is expected",
                    i + 1
                )));
            }
        }
        if self.0.is_empty() {
            return Err(DataError::Invalid(format!("{origin}: no templates")));
        }
        Ok(())
    }

    /// Every prompt for class `name`.
    pub fn prompts(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .map(|t| t.replacen("{c}", name, 1).replacen("{}", name, 1))
            .collect()
    }
}

/// Where class names or templates come from: a built-in name or a file of one per line.
pub fn resolve_lines(spec: &str, kind: &str) -> Result<Vec<String>, DataError> {
    if let Some(b) = builtin(spec) {
        let text = if kind == "templates" { b.2 } else { b.1 };
        return Ok(text.lines().map(str::to_string).collect());
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(DataError::Invalid(format!(
            "{kind} {spec:?}: neither a file nor a built-in list ({})",
            builtin_names().join(", ")
        )));
    }
    read_lines(path)
}

/// The class names and templates a zero-shot task uses, after any subset.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassMeta {
    pub classnames: Vec<String>,
    pub templates: Templates,
}

/// A class subset (ImageNet-R/A style): the indices, into the full class list, of the
/// classes the dataset's labels `0..n` stand for, in label order. Read from a built-in
/// name or a file of one index per line.
pub fn resolve_subset(spec: &str, classes: usize) -> Result<Vec<usize>, DataError> {
    let (text, path) = match SUBSETS.iter().find(|s| s.0 == spec) {
        Some(s) => (s.1.to_string(), Path::new(spec).to_path_buf()),
        None => {
            let p = Path::new(spec);
            let text = std::fs::read_to_string(p).map_err(super::io(p))?;
            (text, p.to_path_buf())
        }
    };
    let lines = parse_lines(&text, &path)?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let k: usize = l.trim().parse().map_err(|_| {
            format_err(
                &path,
                Some(i + 1),
                format!("expected a class index, found {l:?}"),
            )
        })?;
        if k >= classes {
            return Err(format_err(
                &path,
                Some(i + 1),
                format!("class index {k} is outside the {classes} classes"),
            ));
        }
        if out.contains(&k) {
            return Err(format_err(
                &path,
                Some(i + 1),
                format!("class index {k} is listed twice"),
            ));
        }
        out.push(k);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_have_their_published_sizes() {
        let sizes = |n: &str| {
            (
                builtin_classnames(n).unwrap().len(),
                builtin_templates(n).unwrap().0.len(),
            )
        };
        assert_eq!(sizes("imagenet1k"), (1000, 80));
        assert_eq!(sizes("cifar10"), (10, 18));
        assert_eq!(sizes("cifar100"), (100, 18));
        assert_eq!(resolve_subset("imagenet-r", 1000).unwrap().len(), 200);
        assert_eq!(resolve_subset("imagenet-a", 1000).unwrap().len(), 200);
        for n in builtin_names() {
            builtin_templates(n).unwrap().validate(n).unwrap();
        }
        let names = builtin_classnames("imagenet1k").unwrap();
        let r = resolve_subset("imagenet-r", 1000).unwrap();
        let r_names = builtin_classnames("imagenet-r").unwrap();
        assert_eq!(r.len(), r_names.len());
        assert_eq!(names[r[0]], r_names[0]);
    }

    #[test]
    fn templates_take_either_placeholder() {
        let t = Templates(vec!["a {c}.".into(), "itap of a {}.".into()]);
        assert_eq!(t.prompts("cat"), ["a cat.", "itap of a cat."]);
        assert!(Templates(vec!["no slot".into()]).validate("t").is_err());
        assert!(Templates(vec!["{c} {c}".into()]).validate("t").is_err());
    }
}
