using System;
using System.Collections.Generic;
using System.Linq;

namespace EarlyExit.Data
{
    public static class Splits
    {
        /// <summary>
        /// Stratified, seeded split: from every class, round(fraction × class size) samples (at least one where the
        /// class has two or more) go to the first part, the rest to the second. Both parts keep the original order.
        /// </summary>
        public static (int[] first, int[] second) Stratified(int[] labels, int numClasses, double fraction, int seed)
        {
            if (fraction <= 0 || fraction >= 1) throw new ArgumentOutOfRangeException(nameof(fraction), fraction, "split fraction must be strictly between 0 and 1");
            var rng = new Random(seed);
            var byClass = new List<int>[numClasses];
            for (int c = 0; c < numClasses; c++) byClass[c] = new List<int>();
            for (int i = 0; i < labels.Length; i++) byClass[labels[i]].Add(i);
            var first = new List<int>();
            foreach (var members in byClass)
            {
                if (members.Count == 0) continue;
                var shuffled = members.ToArray();
                rng.Shuffle(shuffled);
                int take = (int)Math.Round(fraction * shuffled.Length);
                if (take == 0 && shuffled.Length >= 2) take = 1;
                if (take == shuffled.Length && shuffled.Length >= 2) take = shuffled.Length - 1;
                first.AddRange(shuffled.Take(take));
            }
            var inFirst = new bool[labels.Length];
            foreach (var i in first) inFirst[i] = true;
            var a = Enumerable.Range(0, labels.Length).Where(i => inFirst[i]).ToArray();
            var b = Enumerable.Range(0, labels.Length).Where(i => !inFirst[i]).ToArray();
            return (a, b);
        }

        /// <summary>Carves a stratified validation split (default 10%, seeded) from the training set.</summary>
        public static (ImageDataset train, ImageDataset validation) TrainValidation(ImageDataset train, double validationFraction = 0.1, int seed = 0)
        {
            var (val, rest) = Stratified(train.Labels, train.NumClasses, validationFraction, seed);
            var baseName = train.Name.EndsWith("/train") ? train.Name[..^"/train".Length] : train.Name;
            return (train.Subset(rest, baseName + "/train"), train.Subset(val, baseName + "/validation"));
        }
    }
}
