//! The world's three task families: a prompt format, a generator per split,
//! a gold reward in [0, 1] with partial credit, and a reference solver whose
//! quality is controllable.

use crate::draws::Draws;

/// The task families, in the order `world.prompts` cycles through them.
pub const FAMILIES: [&str; 3] = ["sort", "arith", "keywords"];

const SORT_PREFIX: &str = "Sort ascending: ";
const ARITH_PREFIX: &str = "Compute: ";
const KEYWORDS_PREFIX: &str = "Write a sentence using the words: ";

const TRAIN_WORDS: [&str; 20] = [
    "apple", "river", "garden", "window", "music", "bread", "mountain", "letter", "candle",
    "forest", "bicycle", "ocean", "pencil", "market", "cloud", "teacher", "bridge", "summer",
    "kitchen", "horse",
];
/// Keywords never seen in the train split.
const SHIFTED_WORDS: [&str; 20] = [
    "glacier", "violin", "lantern", "harbor", "meadow", "compass", "orchard", "thunder", "velvet",
    "falcon", "saddle", "quarry", "tunnel", "marble", "pepper", "canyon", "ribbon", "anchor",
    "cactus", "walrus",
];

/// Which distribution prompts are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Short lists, small numbers, two operands, the train vocabulary.
    Train,
    /// Longer lists, larger numbers, three operands, unseen keywords.
    Shifted,
}

impl Split {
    /// Parses `train` or `shifted`.
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "shifted" => Some(Split::Shifted),
            _ => None,
        }
    }
}

/// A prompt of `family` drawn from `split`; `None` for an unknown family.
pub fn generate(family: &str, split: Split, rng: &mut Draws) -> Option<String> {
    let shifted = split == Split::Shifted;
    Some(match family {
        "sort" => {
            let (n, max) = if shifted {
                (rng.range(8, 12), 1000)
            } else {
                (rng.range(4, 6), 49)
            };
            let nums: Vec<String> = (0..n).map(|_| rng.range(0, max).to_string()).collect();
            format!("{SORT_PREFIX}{}", nums.join(" "))
        }
        "arith" => {
            let (n, max) = if shifted { (3, 100) } else { (2, 20) };
            let mut text = rng.range(1, max).to_string();
            for _ in 1..n {
                let op = ["+", "-", "*"][rng.range(0, 2) as usize];
                text.push_str(&format!(" {op} {}", rng.range(1, max)));
            }
            format!("{ARITH_PREFIX}{text}")
        }
        "keywords" => {
            let vocab = if shifted {
                &SHIFTED_WORDS
            } else {
                &TRAIN_WORDS
            };
            let k = rng.range(2, 3) as usize;
            let mut words: Vec<&str> = Vec::new();
            while words.len() < k {
                let w = vocab[rng.range(0, vocab.len() as u64 - 1) as usize];
                if !words.contains(&w) {
                    words.push(w);
                }
            }
            format!(
                "{KEYWORDS_PREFIX}{}. At most {} words.",
                words.join(", "),
                4 * k + 4
            )
        }
        _ => return None,
    })
}

/// A parsed world task.
#[derive(Debug, Clone, PartialEq)]
enum Task {
    Sort(Vec<i64>),
    Arith(Vec<i64>, Vec<char>),
    Keywords(Vec<String>, usize),
}

fn parse(prompt: &str) -> Option<Task> {
    let prompt = prompt.trim();
    if let Some(rest) = prompt.strip_prefix(SORT_PREFIX) {
        let nums: Option<Vec<i64>> = rest.split_whitespace().map(|t| t.parse().ok()).collect();
        return nums.filter(|n| !n.is_empty()).map(Task::Sort);
    }
    if let Some(rest) = prompt.strip_prefix(ARITH_PREFIX) {
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        if tokens.len().is_multiple_of(2) {
            return None;
        }
        let mut nums = Vec::new();
        let mut ops = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if i % 2 == 0 {
                nums.push(t.parse().ok()?);
            } else {
                let op = t
                    .chars()
                    .next()
                    .filter(|c| "+-*".contains(*c) && t.len() == 1)?;
                ops.push(op);
            }
        }
        return Some(Task::Arith(nums, ops));
    }
    if let Some(rest) = prompt.strip_prefix(KEYWORDS_PREFIX) {
        let (words, limit) = rest.split_once(". At most ")?;
        let limit = limit.strip_suffix(" words.")?.parse().ok()?;
        let words: Vec<String> = words.split(", ").map(str::to_string).collect();
        return Some(Task::Keywords(words, limit));
    }
    None
}

/// The family of a world prompt, if it is one.
pub fn family(prompt: &str) -> Option<&'static str> {
    Some(match parse(prompt)? {
        Task::Sort(_) => "sort",
        Task::Arith(..) => "arith",
        Task::Keywords(..) => "keywords",
    })
}

/// Evaluates with `*` before `+` and `-`, or strictly left to right (a
/// plausible mistake).
fn evaluate(nums: &[i64], ops: &[char], precedence: bool) -> i64 {
    if !precedence {
        return ops
            .iter()
            .zip(&nums[1..])
            .fold(nums[0], |acc, (op, n)| apply(acc, *op, *n));
    }
    let mut terms = vec![nums[0]];
    let mut signs = vec!['+'];
    for (op, n) in ops.iter().zip(&nums[1..]) {
        if *op == '*' {
            let last = terms.last_mut().expect("terms start non-empty");
            *last *= n;
        } else {
            terms.push(*n);
            signs.push(*op);
        }
    }
    terms
        .iter()
        .zip(signs)
        .fold(0, |acc, (t, s)| apply(acc, s, *t))
}

fn apply(a: i64, op: char, b: i64) -> i64 {
    match op {
        '+' => a + b,
        '-' => a - b,
        _ => a * b,
    }
}

fn words(text: &str) -> Vec<String> {
    hone_sdk::text::normalize(text)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The gold reward of `response` to `prompt`, in [0, 1]; `None` if the
/// prompt is not a world task.
pub fn gold_reward(prompt: &str, response: &str) -> Option<f64> {
    Some(match parse(prompt)? {
        Task::Sort(nums) => sort_reward(&nums, response),
        Task::Arith(nums, ops) => arith_reward(evaluate(&nums, &ops, true), response),
        Task::Keywords(keywords, limit) => keywords_reward(&keywords, limit, response),
    })
}

/// Fraction of adjacent pairs in order × multiset overlap with the input.
fn sort_reward(nums: &[i64], response: &str) -> f64 {
    let got: Vec<i64> = response
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.parse().ok())
        .collect();
    if got.is_empty() {
        return 0.0;
    }
    let in_order = if got.len() < 2 {
        1.0
    } else {
        got.windows(2).filter(|w| w[0] <= w[1]).count() as f64 / (got.len() - 1) as f64
    };
    let mut remaining = nums.to_vec();
    let mut common = 0;
    for g in &got {
        if let Some(i) = remaining.iter().position(|n| n == g) {
            remaining.swap_remove(i);
            common += 1;
        }
    }
    in_order * common as f64 / nums.len().max(got.len()) as f64
}

/// 1 for the exact answer; otherwise at most 0.8, decaying with the
/// relative error; 0 when the response is not a number.
fn arith_reward(truth: i64, response: &str) -> f64 {
    let Ok(got) = response.trim().trim_end_matches('.').parse::<f64>() else {
        return 0.0;
    };
    let truth = truth as f64;
    if (got - truth).abs() < 1e-9 {
        return 1.0;
    }
    0.8 * (-5.0 * (got - truth).abs() / truth.abs().max(1.0)).exp()
}

/// Fraction of keywords used, minus 0.1 per word over the limit.
fn keywords_reward(keywords: &[String], limit: usize, response: &str) -> f64 {
    let used = words(response);
    if used.is_empty() {
        return 0.0;
    }
    let hits = keywords
        .iter()
        .filter(|k| used.contains(&k.to_lowercase()))
        .count();
    let over = used.len().saturating_sub(limit) as f64;
    (hits as f64 / keywords.len() as f64 * (1.0 - 0.1 * over)).max(0.0)
}

/// A reference answer to a world prompt (`None` if it is not one). Quality
/// 1 is always right; below 1, each of three mistake opportunities strikes
/// with probability `1 - quality`: a swapped pair or a lost number when
/// sorting, off-by-one or left-to-right evaluation in arithmetic, a missing
/// keyword or padding past the length limit in sentences.
pub fn solve(prompt: &str, quality: f64, rng: &mut Draws) -> Option<String> {
    let task = parse(prompt)?;
    let mistakes = (0..3).filter(|_| rng.chance(1.0 - quality)).count();
    Some(match task {
        Task::Sort(mut nums) => {
            nums.sort_unstable();
            for _ in 0..mistakes {
                let i = rng.range(0, nums.len() as u64 - 1) as usize;
                if rng.chance(0.75) && nums.len() > 1 {
                    let j = if i + 1 < nums.len() { i + 1 } else { i - 1 };
                    nums.swap(i, j);
                } else if nums.len() > 1 {
                    nums.remove(i);
                }
            }
            nums.iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        }
        Task::Arith(nums, ops) => {
            let mut answer = evaluate(&nums, &ops, true);
            for _ in 0..mistakes {
                answer = match rng.range(0, 2) {
                    0 => answer + 1,
                    1 => answer - 1,
                    _ => evaluate(&nums, &ops, false) + answer - evaluate(&nums, &ops, true),
                };
            }
            answer.to_string()
        }
        Task::Keywords(mut keywords, limit) => {
            let mut padding = 0;
            for _ in 0..mistakes {
                if rng.chance(0.5) && !keywords.is_empty() {
                    let i = rng.range(0, keywords.len() as u64 - 1) as usize;
                    keywords[i] = "thing".into();
                } else {
                    padding += rng.range(2, 5) as usize;
                }
            }
            let listed = keywords
                .iter()
                .map(|k| format!("the {k}"))
                .collect::<Vec<_>>();
            let mut sentence = format!("I saw {} today", listed.join(" and "));
            let count = sentence.split(' ').count();
            if padding > 0 {
                let extra = (limit + padding).saturating_sub(count);
                sentence.push_str(&" and then".repeat(extra.div_ceil(2)));
            }
            sentence + "."
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_gives_partial_credit_by_order_and_multiset() {
        let p = "Sort ascending: 5 3 9 1";
        assert_eq!(gold_reward(p, "1 3 5 9"), Some(1.0));
        assert_eq!(gold_reward(p, "1, 3, 5, 9"), Some(1.0));
        let swapped = gold_reward(p, "3 1 5 9").unwrap();
        assert!((swapped - 2.0 / 3.0).abs() < 1e-9, "{swapped}");
        let missing = gold_reward(p, "1 3 5").unwrap();
        assert!((missing - 0.75).abs() < 1e-9, "{missing}");
        assert_eq!(gold_reward(p, "no idea"), Some(0.0));
    }

    #[test]
    fn arith_respects_precedence_and_decays_with_error() {
        let p = "Compute: 12 + 7 * 3";
        assert_eq!(gold_reward(p, "33"), Some(1.0));
        let off = gold_reward(p, "34").unwrap();
        let far = gold_reward(p, "57").unwrap();
        assert!(off < 1.0 && off > far && far > 0.0, "{off} {far}");
        assert_eq!(gold_reward(p, "thirty-three"), Some(0.0));
        assert_eq!(gold_reward("Compute: 10 - 2 - 3", "5"), Some(1.0));
    }

    #[test]
    fn keywords_credit_each_word_and_penalise_length() {
        let p = "Write a sentence using the words: apple, river. At most 12 words.";
        assert_eq!(gold_reward(p, "An apple fell in the river."), Some(1.0));
        assert_eq!(gold_reward(p, "An apple fell."), Some(0.5));
        let long = "An apple fell in the river and then and then and then and then.";
        assert!(gold_reward(p, long).unwrap() < 1.0);
        assert_eq!(gold_reward(p, ""), Some(0.0));
    }

    #[test]
    fn unknown_prompts_have_no_gold_reward() {
        assert_eq!(gold_reward("What is the capital of France?", "Paris"), None);
        assert_eq!(gold_reward("Compute: 1 +", "1"), None);
        assert_eq!(family("Sort ascending: 1 2"), Some("sort"));
    }

    fn mean_reward(split: Split, quality: f64) -> f64 {
        let mut total = 0.0;
        let n = 300;
        for i in 0..n {
            let family = FAMILIES[i % 3];
            let prompt = generate(family, split, &mut Draws::new(7, format!("p{i}"))).unwrap();
            let answer = solve(&prompt, quality, &mut Draws::new(7, format!("s{i}"))).unwrap();
            let r = gold_reward(&prompt, &answer).unwrap();
            if quality == 1.0 {
                assert_eq!(r, 1.0, "{prompt} -> {answer}");
            }
            total += r;
        }
        total / n as f64
    }

    #[test]
    fn solver_quality_controls_gold_reward() {
        for split in [Split::Train, Split::Shifted] {
            assert_eq!(mean_reward(split, 1.0), 1.0);
            let high = mean_reward(split, 0.8);
            let low = mean_reward(split, 0.4);
            assert!(1.0 > high && high > low, "{split:?}: {high} {low}");
        }
    }

    #[test]
    fn shifted_prompts_are_longer_and_use_unseen_words() {
        let mut rng = Draws::new(1, "x");
        for _ in 0..50 {
            let Some(Task::Sort(train)) = parse(&generate("sort", Split::Train, &mut rng).unwrap())
            else {
                panic!()
            };
            assert!((4..=6).contains(&train.len()) && train.iter().all(|n| *n < 50));
            let Some(Task::Sort(shifted)) =
                parse(&generate("sort", Split::Shifted, &mut rng).unwrap())
            else {
                panic!()
            };
            assert!((8..=12).contains(&shifted.len()));
            let Some(Task::Arith(nums, _)) =
                parse(&generate("arith", Split::Shifted, &mut rng).unwrap())
            else {
                panic!()
            };
            assert_eq!(nums.len(), 3);
            let Some(Task::Keywords(words, _)) =
                parse(&generate("keywords", Split::Shifted, &mut rng).unwrap())
            else {
                panic!()
            };
            assert!(words.iter().all(|w| !TRAIN_WORDS.contains(&w.as_str())));
        }
    }
}
