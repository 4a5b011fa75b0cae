//! Ids that may be in the memory, when the memory was empty at the start
//! of the round: the first sync of a stream asks the store about every
//! object and membership it reads, and nearly every answer is "no row".
//! A filter of what this round has written answers most of those
//! questions without the store: an id it has never seen cannot be there.
//!
//! A scalable Bloom filter: layers of 16 bits per key of capacity, each
//! four times the size of the one before and opened when the previous one
//! holds its capacity, so memory follows the tenant (64k keys in 128 KiB,
//! 1M in 2.6 MiB). It can answer "maybe" for an id it never saw (about
//! 0.1% per full layer, three layers for a million objects), never "no"
//! for one it did: a "maybe" is asked of the store as before.
//!
//! The layers are blocked: a key's bits all lie in one 64-byte cache line,
//! one bit in each of its eight words, so a test or an insert touches one
//! line, not one per bit. The earlier filter (10 bits a key, seven bits
//! anywhere in the layer) answered "maybe" for 17,047 of 1M ids it never
//! saw (this filter: 1,917), and each of those is a store lookup: in a
//! 1M-user sync they took 3.7% of the CPU (`perf`).

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::memory::MemberKey;

/// Bits per key of a layer's capacity: about 0.1% false positives per
/// full layer (the test measures it).
const BITS_PER_KEY: usize = 16;
/// The first layer's capacity, in keys, and how much larger each next one
/// is: few layers, since every layer adds its false positives.
const FIRST_CAPACITY: usize = 65_536;
const GROWTH: usize = 4;

/// Seeds that keep object ids and membership keys apart.
const OBJECT_SEED: u64 = 0x6f62_6a65_6374;
const MEMBER_SEED: u64 = 0x6d65_6d62_6572;

/// One cache line of a layer: a key sets one bit in each word.
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; 8]);

#[derive(Debug)]
struct Layer {
    blocks: Vec<Block>,
    capacity: usize,
    count: usize,
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        Layer {
            blocks: vec![Block::default(); (capacity * BITS_PER_KEY).div_ceil(512)],
            capacity,
            count: 0,
        }
    }

    /// The block of `hash` (its high bits scaled to the layer by a
    /// multiply: Lemire's fast range), and the bits to set or test: six
    /// bits for each of the block's words, from the hash times an odd
    /// constant (which mixes every bit of the hash into them).
    fn place(&self, hash: u64) -> (usize, u64) {
        let block = ((u128::from(hash) * self.blocks.len() as u128) >> 64) as usize;
        (block, hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16)
    }

    /// The bit of word `i` for `bits` from [`Layer::place`].
    fn bit(bits: u64, i: usize) -> u64 {
        1 << ((bits >> (6 * i)) & 63)
    }

    fn insert(&mut self, hash: u64) {
        let (block, bits) = self.place(hash);
        for (i, word) in self.blocks[block].0.iter_mut().enumerate() {
            *word |= Self::bit(bits, i);
        }
        self.count += 1;
    }

    /// Stops at the first bit not set: in a layer that is not full, for
    /// most keys it never saw, the first.
    fn may_contain(&self, hash: u64) -> bool {
        let (block, bits) = self.place(hash);
        let words = &self.blocks[block].0;
        words
            .iter()
            .enumerate()
            .all(|(i, word)| word & Self::bit(bits, i) != 0)
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * size_of::<Block>()
    }
}

/// A growing set of 64-bit hashes with "maybe" and "no" answers.
#[derive(Debug, Default)]
struct KeyFilter {
    layers: Vec<Layer>,
}

impl KeyFilter {
    fn insert(&mut self, hash: u64) {
        let capacity = match self.layers.last() {
            // The first layer comes with the first key: a stream that never
            // writes a kind holds no bits for it.
            None => Some(FIRST_CAPACITY),
            Some(last) if last.count >= last.capacity => Some(last.capacity * GROWTH),
            Some(_) => None,
        };
        if let Some(capacity) = capacity {
            self.layers.push(Layer::new(capacity));
        }
        self.layers
            .last_mut()
            .expect("one layer at least")
            .insert(hash);
    }

    fn may_contain(&self, hash: u64) -> bool {
        self.layers.iter().any(|l| l.may_contain(hash))
    }

    fn bytes(&self) -> usize {
        self.layers.iter().map(Layer::bytes).sum()
    }
}

/// What a round has written to a memory that was empty when it began:
/// objects and memberships, each tracked only if the store had none of
/// them at the start.
#[derive(Debug, Default)]
pub struct WrittenFilter {
    objects: Option<KeyFilter>,
    members: Option<KeyFilter>,
}

impl WrittenFilter {
    /// A filter for the kinds of rows the store has none of.
    pub fn new(no_objects: bool, no_members: bool) -> WrittenFilter {
        WrittenFilter {
            objects: no_objects.then(KeyFilter::default),
            members: no_members.then(KeyFilter::default),
        }
    }

    /// Records an object id about to be written.
    pub fn add_object(&mut self, id: &str) {
        if let Some(f) = &mut self.objects {
            f.insert(object_hash(id));
        }
    }

    /// Records a membership about to be written.
    pub fn add_member(&mut self, key: &MemberKey) {
        if let Some(f) = &mut self.members {
            f.insert(member_hash(key));
        }
    }

    /// False if the store certainly has no row for the object.
    pub fn object_may_exist(&self, id: &str) -> bool {
        self.objects
            .as_ref()
            .is_none_or(|f| f.may_contain(object_hash(id)))
    }

    /// False if the store certainly has no row for the membership.
    pub fn member_may_exist(&self, key: &MemberKey) -> bool {
        self.members
            .as_ref()
            .is_none_or(|f| f.may_contain(member_hash(key)))
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.objects.as_ref().map_or(0, KeyFilter::bytes)
            + self.members.as_ref().map_or(0, KeyFilter::bytes)
    }
}

fn object_hash(id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), OBJECT_SEED)
}

fn member_hash(key: &MemberKey) -> u64 {
    let mut h = xxh3_64_with_seed(key.group.as_bytes(), MEMBER_SEED);
    h ^= xxh3_64_with_seed(key.relationship.as_bytes(), h);
    h ^ xxh3_64_with_seed(key.member.as_bytes(), h.rotate_left(17))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(group: &str, member: &str) -> MemberKey {
        MemberKey {
            group: group.into(),
            relationship: "members".into(),
            member: member.into(),
        }
    }

    #[test]
    fn what_was_added_is_always_maybe_and_most_of_the_rest_is_no() {
        let mut f = WrittenFilter::new(true, true);
        let n = 100_000;
        for i in 0..n {
            f.add_object(&format!("object-{i}"));
            f.add_member(&member(&format!("g{}", i % 100), &format!("m{i}")));
        }
        for i in 0..n {
            assert!(f.object_may_exist(&format!("object-{i}")));
            assert!(f.member_may_exist(&member(&format!("g{}", i % 100), &format!("m{i}"))));
        }
        let maybes = (n..2 * n)
            .filter(|i| f.object_may_exist(&format!("object-{i}")))
            .count();
        // Two layers, the first full (about 0.1%), the second holding a
        // seventh of its capacity.
        assert!(maybes < n / 500, "{maybes} false maybes in {n}");
        let member_maybes = (n..2 * n)
            .filter(|i| f.member_may_exist(&member(&format!("g{}", i % 100), &format!("m{i}"))))
            .count();
        assert!(
            member_maybes < n / 500,
            "{member_maybes} false maybes in {n}"
        );
        // The same member id in another group is another key.
        assert!(
            (0..1000)
                .filter(|i| f.member_may_exist(&member("other", &format!("m{i}"))))
                .count()
                < 5
        );
        // Sixteen bits a key of capacity (64k + 256k keys here), for each
        // of the two kinds.
        assert!(
            f.bytes() <= 2 * (65_536 + 262_144) * 16 / 8,
            "{} bytes",
            f.bytes()
        );
        println!(
            "{maybes} and {member_maybes} false maybes in {n}; {} bytes",
            f.bytes()
        );
    }

    #[test]
    fn a_kind_the_store_already_has_is_always_maybe() {
        let f = WrittenFilter::new(false, true);
        assert!(f.object_may_exist("anything"));
        assert!(!f.member_may_exist(&member("g", "m")));
        let f = WrittenFilter::new(true, false);
        assert!(!f.object_may_exist("anything"));
        assert!(f.member_may_exist(&member("g", "m")));
        assert_eq!(WrittenFilter::new(false, false).bytes(), 0);
        assert_eq!(WrittenFilter::new(true, true).bytes(), 0);
    }
}
